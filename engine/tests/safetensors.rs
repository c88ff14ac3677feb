//! The safetensors loader against the GGUF loader on the same weights.
//!
//! The default GGUF is written out as a Hugging Face style checkpoint (`config.json`,
//! `model.safetensors`, f32), with the query/key projections permuted back from
//! llama.cpp's interleaved rotary layout to the half-split one Hugging Face uses. Both
//! loaders then run the same prompt: the logits must agree, which checks the loader,
//! the tensor names, the config fields and the half-split rotary embedding at once.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use kvstrata_engine::fetch;
use kvstrata_engine::kv::{KvGeometry, PagedKv};
use kvstrata_engine::model::{LlamaModel, argmax, max_abs_diff};

/// Undoes llama.cpp's permutation of a `[heads * head_dim, in]` projection.
fn unpermute(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    let hd = out / heads;
    w.reshape((heads, hd / 2, 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

#[test]
fn safetensors_checkpoint_matches_gguf() {
    let path = fetch::ensure_default_model(&fetch::default_model_dir(), false)
        .expect("the default model must be fetchable (network) or present");
    let mut reader = BufReader::new(File::open(&path).unwrap());
    let ct = gguf_file::Content::read(&mut reader).unwrap();
    let gguf = LlamaModel::from_gguf(&ct, &mut reader, &path).unwrap();
    let c = gguf.config().clone();

    let dev = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut get = |name: &str| {
        ct.tensor(&mut reader, name, &dev)
            .unwrap()
            .dequantize(&dev)
            .unwrap()
    };
    tensors.insert("model.embed_tokens.weight".into(), get("token_embd.weight"));
    tensors.insert("model.norm.weight".into(), get("output_norm.weight"));
    for i in 0..c.num_layers {
        let (g, h) = (format!("blk.{i}"), format!("model.layers.{i}"));
        let names = [
            ("attn_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"),
            ("ffn_down", "mlp.down_proj"),
        ];
        for (from, to) in names {
            tensors.insert(
                format!("{h}.{to}.weight"),
                get(&format!("{g}.{from}.weight")),
            );
        }
        let q = get(&format!("{g}.attn_q.weight"));
        let k = get(&format!("{g}.attn_k.weight"));
        tensors.insert(
            format!("{h}.self_attn.q_proj.weight"),
            unpermute(&q, c.num_heads),
        );
        tensors.insert(
            format!("{h}.self_attn.k_proj.weight"),
            unpermute(&k, c.num_kv_heads),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_eps,
        "max_position_embeddings": c.max_context,
        "tie_word_embeddings": true,
        "rope_scaling": null,
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let st = LlamaModel::from_safetensors_dir(dir.path()).unwrap();
    assert_eq!(st.config().num_layers, c.num_layers);

    let geometry = KvGeometry {
        num_layers: c.num_layers,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        block_tokens: 16,
    };
    // Token ids of an arbitrary sentence; 37 positions cross two block boundaries.
    let tokens: Vec<u32> = (0..37u32).map(|i| 100 + (i * 977) % 40_000).collect();
    let mut kv_a = PagedKv::new(geometry).unwrap();
    let mut kv_b = PagedKv::new(geometry).unwrap();
    let a = gguf.forward(&tokens, &mut kv_a).unwrap();
    let b = st.forward(&tokens, &mut kv_b).unwrap();
    let diff = max_abs_diff(&a, &b);
    assert!(diff < 1e-2, "logits differ by {diff}");
    assert_eq!(argmax(&a), argmax(&b));
    // One more position, from the pages each loader filled.
    let a2 = gguf.forward(&[argmax(&a)], &mut kv_a).unwrap();
    let b2 = st.forward(&[argmax(&b)], &mut kv_b).unwrap();
    assert!(max_abs_diff(&a2, &b2) < 1e-2);
}
