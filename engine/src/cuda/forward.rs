//! The Llama-family forward pass on a CUDA device.
//!
//! Per layer: RMSNorm (kernel) → fused q/k/v projection (cuBLAS) → rotary
//! embeddings (kernel) → new K/V rows stored into the sequence's pages as f16
//! (kernel) → attention over the pages, causal within the chunk (kernel) →
//! output projection added into the residual (cuBLAS, β = 1) → RMSNorm →
//! fused gate/up projection (cuBLAS) → SwiGLU (kernel) → down projection added
//! into the residual (cuBLAS). The residual stream is f32; matrix-product inputs
//! are rounded to the weights' 16-bit type; products accumulate in f32.
//!
//! Like the CPU engine, attention always reads K and V back from the pages,
//! also for positions computed in the same pass: what a pass attends to is the
//! same whether the pages were computed now or loaded from kvstrata. Prompts
//! run in chunks of at most `max_chunk` positions (the activation buffers are
//! sized for one chunk). [`super::reference::forward`] is the same pass on the
//! CPU.

use std::sync::{Arc, Mutex};

use super::device::{AttentionKernel, CudaDevice, DevMem};
use super::error::CudaError;
use super::kv::{GpuKvPool, GpuSequence};
use super::reference::{RopeTables, Storage};
use super::weights::GpuWeights;
use crate::kv::KvGeometry;
use crate::model::{LlamaConfig, RopeStyle};

/// How a [`GpuModel`] sizes its buffers.
#[derive(Debug, Clone, Copy)]
pub struct GpuModelOptions {
    /// Most positions per pass of the layers (prompt chunk).
    pub max_chunk: usize,
    /// Most positions of a sequence (rotary tables are built for these);
    /// capped at the model's context length.
    pub max_positions: usize,
    /// The attention kernel; `None`: [`AttentionKernel::auto`].
    pub attention: Option<AttentionKernel>,
}

impl Default for GpuModelOptions {
    fn default() -> Self {
        GpuModelOptions {
            max_chunk: 1024,
            max_positions: 32 * 1024,
            attention: None,
        }
    }
}

/// Activation buffers for one chunk.
struct Scratch {
    ids: DevMem,
    x: DevMem,
    h16: DevMem,
    qkv: DevMem,
    a16: DevMem,
    gate_up: DevMem,
    m16: DevMem,
    logits: DevMem,
    top_index: DevMem,
    top_value: DevMem,
}

/// Most candidates [`GpuModel::top_k`] returns.
pub const MAX_TOP_K: usize = 1024;

/// A model on one device, ready for forward passes.
pub struct GpuModel {
    dev: Arc<CudaDevice>,
    config: LlamaConfig,
    weights: GpuWeights,
    cos: DevMem,
    sin: DevMem,
    positions: usize,
    max_chunk: usize,
    attention: AttentionKernel,
    scratch: Mutex<Scratch>,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel")
            .field("config", &self.config)
            .field("storage", &self.weights.storage)
            .field("weight_bytes", &self.weights.bytes())
            .field("attention", &self.attention)
            .finish()
    }
}

impl GpuModel {
    /// A model over `weights` (already on `dev`) with `config`'s geometry.
    pub fn new(
        dev: Arc<CudaDevice>,
        config: LlamaConfig,
        weights: GpuWeights,
        options: GpuModelOptions,
    ) -> Result<Self, CudaError> {
        let c = &config;
        if c.num_kv_heads == 0
            || !c.num_heads.is_multiple_of(c.num_kv_heads)
            || !c.head_dim.is_multiple_of(2)
            || c.head_dim > 128
        {
            return Err(CudaError::Unsupported(format!(
                "{} heads over {} kv heads of dim {} (even dims up to 128, whole groups)",
                c.num_heads, c.num_kv_heads, c.head_dim
            )));
        }
        let positions = options.max_positions.min(c.max_context).max(1);
        let max_chunk = options.max_chunk.clamp(1, positions);
        let tables = RopeTables::new(c.head_dim, c.rope_theta, positions);
        let cos = dev.alloc(tables.cos.len() * 4)?;
        let sin = dev.alloc(tables.sin.len() * 4)?;
        dev.upload(cos.ptr(), &tables.cos)?;
        dev.upload(sin.ptr(), &tables.sin)?;
        let qd = c.num_heads * c.head_dim;
        let qkv_dim = qd + 2 * c.num_kv_heads * c.head_dim;
        let chunk = max_chunk;
        let scratch = Scratch {
            ids: dev.alloc(chunk * 4)?,
            x: dev.alloc(chunk * c.hidden_size * 4)?,
            h16: dev.alloc(chunk * c.hidden_size * 2)?,
            qkv: dev.alloc(chunk * qkv_dim * 4)?,
            a16: dev.alloc(chunk * qd * 2)?,
            gate_up: dev.alloc(chunk * 2 * c.intermediate_size * 4)?,
            m16: dev.alloc(chunk * c.intermediate_size * 2)?,
            logits: dev.alloc(c.vocab_size * 4)?,
            top_index: dev.alloc(MAX_TOP_K * 4)?,
            top_value: dev.alloc(MAX_TOP_K * 4)?,
        };
        dev.synchronize()?;
        let attention = options
            .attention
            .unwrap_or_else(|| AttentionKernel::auto(config.head_dim));
        Ok(GpuModel {
            dev,
            config,
            weights,
            cos,
            sin,
            positions,
            max_chunk,
            attention,
            scratch: Mutex::new(scratch),
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The device it runs on.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// The weights' storage type.
    pub fn storage(&self) -> Storage {
        self.weights.storage
    }

    /// Bytes of weights on the device.
    pub fn weight_bytes(&self) -> u64 {
        self.weights.bytes()
    }

    /// The attention kernel it runs.
    pub fn attention_kernel(&self) -> AttentionKernel {
        self.attention
    }

    /// Longest sequence this model was set up for.
    pub fn max_positions(&self) -> usize {
        self.positions
    }

    /// The KV geometry of this model with `block_tokens` positions per page.
    pub fn geometry(&self, block_tokens: usize) -> KvGeometry {
        KvGeometry {
            num_layers: self.config.num_layers,
            num_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
            block_tokens,
        }
    }

    /// A KV pool of `pages` pages for this model.
    pub fn kv_pool(&self, block_tokens: usize, pages: usize) -> Result<Arc<GpuKvPool>, CudaError> {
        GpuKvPool::new(Arc::clone(&self.dev), self.geometry(block_tokens), pages)
    }

    /// Runs `tokens` at positions `seq.len()..`, appending their K/V to `seq`'s
    /// pages, and returns the logits of the last position (f32, `[vocab]`).
    pub fn forward(&self, tokens: &[u32], seq: &mut GpuSequence) -> Result<Vec<f32>, CudaError> {
        let scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        self.run(tokens, seq, &scratch)?;
        let mut logits = vec![0f32; self.config.vocab_size];
        self.dev.download(&mut logits, scratch.logits.ptr())?;
        Ok(logits)
    }

    /// Like [`GpuModel::forward`], but returns only the `k` largest logits
    /// (largest first, ties to the lower id), selected on the device; `k = 1`
    /// is greedy decoding.
    pub fn forward_top_k(
        &self,
        tokens: &[u32],
        seq: &mut GpuSequence,
        k: usize,
    ) -> Result<Vec<(u32, f32)>, CudaError> {
        if k == 0 || k > MAX_TOP_K {
            return Err(CudaError::InvalidRequest(format!(
                "top-k of {k} (1..={MAX_TOP_K})"
            )));
        }
        let scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        self.run(tokens, seq, &scratch)?;
        // SAFETY: the logits buffer holds `vocab` f32s, the outputs MAX_TOP_K each.
        unsafe {
            self.dev.top_k(
                scratch.logits.ptr(),
                self.config.vocab_size as u32,
                k as u32,
                scratch.top_index.ptr(),
                scratch.top_value.ptr(),
            )?;
        }
        let mut idx = vec![0u32; k];
        let mut val = vec![0f32; k];
        self.dev.download(&mut idx, scratch.top_index.ptr())?;
        self.dev.download(&mut val, scratch.top_value.ptr())?;
        Ok(idx.into_iter().zip(val).collect())
    }

    /// Greedy generation of `max_new` tokens after `first` (included in the
    /// output), each step one position through [`GpuModel::forward_top_k`].
    pub fn generate_greedy(
        &self,
        first: u32,
        seq: &mut GpuSequence,
        max_new: usize,
    ) -> Result<Vec<u32>, CudaError> {
        let mut out = vec![first];
        while out.len() < max_new {
            let last = *out.last().unwrap_or(&first);
            let top = self.forward_top_k(&[last], seq, 1)?;
            out.push(top[0].0);
        }
        Ok(out)
    }

    fn validate(&self, tokens: &[u32], seq: &GpuSequence) -> Result<(), CudaError> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(CudaError::InvalidRequest("no tokens to run".into()));
        }
        if seq.len() + tokens.len() > self.positions {
            return Err(CudaError::InvalidRequest(format!(
                "context of {} tokens exceeds the {} this model was set up for",
                seq.len() + tokens.len(),
                self.positions
            )));
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(CudaError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        let g = seq.pool().geometry();
        if g.num_layers != c.num_layers
            || g.num_kv_heads != c.num_kv_heads
            || g.head_dim != c.head_dim
        {
            return Err(CudaError::InvalidRequest(format!(
                "the sequence's pages are {g:?}, the model's geometry differs"
            )));
        }
        Ok(())
    }

    /// The layers over `tokens`, leaving the last position's logits in
    /// `scratch.logits`.
    fn run(&self, tokens: &[u32], seq: &mut GpuSequence, sc: &Scratch) -> Result<(), CudaError> {
        self.validate(tokens, seq)?;
        let c = &self.config;
        let s = self.weights.storage;
        let dev = &self.dev;
        let (h, nh, nkv, hd) = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim);
        let inter = c.intermediate_size;
        let qd = nh * hd;
        let kvd = nkv * hd;
        let qkv_dim = qd + 2 * kvd;
        let eps = c.rms_eps as f32;
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let interleaved = c.rope_style == RopeStyle::Interleaved;
        let pool = Arc::clone(seq.pool());
        let g = *pool.geometry();
        let start0 = seq.len();
        seq.reserve(tokens.len())?;
        let pages = seq.table_ptr();
        let mut last_rows = 0;
        for (ci, chunk) in tokens.chunks(self.max_chunk).enumerate() {
            let n = chunk.len();
            let start = start0 + ci * self.max_chunk;
            dev.upload(sc.ids.ptr(), chunk)?;
            // SAFETY: every buffer was sized for max_chunk rows of this model,
            // the page table covers start + n positions (reserved above), the
            // weights match the config (checked when they were made), and the
            // ids were checked against the vocabulary.
            unsafe {
                dev.embed(
                    s,
                    self.weights.embed.ptr(),
                    sc.ids.ptr(),
                    sc.x.ptr(),
                    n as u32,
                    h as u32,
                )?;
                for (li, w) in self.weights.layers.iter().enumerate() {
                    dev.rms_norm(
                        s,
                        sc.x.ptr(),
                        h as u64,
                        w.attn_norm.ptr(),
                        sc.h16.ptr(),
                        h as u64,
                        n as u32,
                        h as u32,
                        eps,
                    )?;
                    dev.gemm(
                        s,
                        sc.h16.ptr(),
                        w.wqkv.ptr(),
                        sc.qkv.ptr(),
                        n,
                        h,
                        qkv_dim,
                        false,
                    )?;
                    dev.rope(
                        sc.qkv.ptr(),
                        qkv_dim as u64,
                        self.cos.ptr(),
                        self.sin.ptr(),
                        n as u32,
                        start as u32,
                        (nh + nkv) as u32,
                        hd as u32,
                        interleaved,
                    )?;
                    dev.kv_store(
                        sc.qkv.ptr(),
                        qkv_dim as u64,
                        qd as u32,
                        (qd + kvd) as u32,
                        pool.memory().ptr(),
                        pages,
                        g.page_elems() as u64,
                        li as u32,
                        g.block_tokens as u32,
                        kvd as u32,
                        n as u32,
                        start as u32,
                    )?;
                    dev.attention(
                        s,
                        self.attention,
                        sc.qkv.ptr(),
                        qkv_dim as u64,
                        pool.memory().ptr(),
                        pages,
                        g.page_elems() as u64,
                        li as u32,
                        g.block_tokens as u32,
                        nkv as u32,
                        hd as u32,
                        nh as u32,
                        n as u32,
                        start as u32,
                        scale,
                        sc.a16.ptr(),
                        qd as u64,
                    )?;
                    dev.gemm(s, sc.a16.ptr(), w.wo.ptr(), sc.x.ptr(), n, qd, h, true)?;
                    dev.rms_norm(
                        s,
                        sc.x.ptr(),
                        h as u64,
                        w.ffn_norm.ptr(),
                        sc.h16.ptr(),
                        h as u64,
                        n as u32,
                        h as u32,
                        eps,
                    )?;
                    dev.gemm(
                        s,
                        sc.h16.ptr(),
                        w.w_gate_up.ptr(),
                        sc.gate_up.ptr(),
                        n,
                        h,
                        2 * inter,
                        false,
                    )?;
                    dev.swiglu(s, sc.gate_up.ptr(), sc.m16.ptr(), n as u32, inter as u32)?;
                    dev.gemm(
                        s,
                        sc.m16.ptr(),
                        w.w_down.ptr(),
                        sc.x.ptr(),
                        n,
                        inter,
                        h,
                        true,
                    )?;
                }
            }
            last_rows = n;
        }
        // SAFETY: as above; the last chunk's last row is row last_rows - 1 of x.
        unsafe {
            dev.rms_norm(
                s,
                sc.x.ptr() + ((last_rows - 1) * h * 4) as u64,
                h as u64,
                self.weights.final_norm.ptr(),
                sc.h16.ptr(),
                h as u64,
                1,
                h as u32,
                eps,
            )?;
            dev.gemm(
                s,
                sc.h16.ptr(),
                self.weights.output_ptr(),
                sc.logits.ptr(),
                1,
                h,
                c.vocab_size,
                false,
            )?;
        }
        seq.commit(tokens.len());
        Ok(())
    }
}
