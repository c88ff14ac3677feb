//! The engines' view of kvstrata: one namespace, chained keys, and moving pages.
//!
//! A [`BlockStore`] registers the model's KV geometry as a namespace (the model's
//! fingerprint is part of it, so another checkpoint can never hit these blocks), asks
//! how much of a prompt's key chain is cached, loads cached blocks into a
//! [`PagedKv`] and stores new full pages with their parent keys.
//!
//! Bytes move through a shared-memory pool when the daemon's mempool socket is given
//! (same host: the daemon copies straight between its tier and the pool), else inline
//! in the gRPC messages. Both paths check every block's size before it becomes a page.
//! The pages are anything that is [`BlockPages`]: the CPU engine's [`PagedKv`], or the
//! GPU engine's sequence when it cannot use the daemon's GPU path
//! (`crate::cuda::GpuKvStore`).

use std::borrow::Cow;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvstrata_client::{BlockHash, Client, PutItem, RangePutItem, SharedPool, block_keys, proto};
use kvstrata_types::{NamespaceId, NamespaceSpec};

use crate::error::{EngineError, Result};
use crate::kv::{KvGeometry, PagedKv};

/// Blocks per BatchGet/BatchPut message.
pub const BLOCKS_PER_BATCH: usize = 32;

/// Pages a [`BlockStore`] loads blocks into and stores blocks from.
pub trait BlockPages {
    /// Bytes of one block (one page).
    fn block_bytes(&self) -> usize;
    /// Full pages held.
    fn full_pages(&self) -> usize;
    /// The bytes of full page `index` (one block payload).
    fn page_bytes(&self, index: usize) -> Result<Cow<'_, [u8]>>;
    /// Appends one block as the next page.
    fn push_block(&mut self, payload: &[u8]) -> Result<()>;
}

impl BlockPages for PagedKv {
    fn block_bytes(&self) -> usize {
        self.geometry().block_bytes()
    }

    fn full_pages(&self) -> usize {
        PagedKv::full_pages(self)
    }

    fn page_bytes(&self, index: usize) -> Result<Cow<'_, [u8]>> {
        PagedKv::page_bytes(self, index).map(Cow::Borrowed)
    }

    fn push_block(&mut self, payload: &[u8]) -> Result<()> {
        PagedKv::push_block(self, payload)
    }
}

/// What a load moved.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Blocks appended to the pages (a prefix of the keys asked for).
    pub blocks: usize,
    /// Tier each loaded block came from.
    pub tiers: Vec<proto::Tier>,
    pub elapsed: Duration,
}

/// What a store moved.
#[derive(Debug, Clone, Default)]
pub struct StoreReport {
    pub stored: usize,
    /// Blocks the daemon had no room for (every candidate pinned).
    pub no_space: usize,
    pub elapsed: Duration,
}

/// One model's namespace on one daemon.
pub struct BlockStore {
    client: Client,
    spec: NamespaceSpec,
    ns: NamespaceId,
    geometry: KvGeometry,
    pool: Option<SharedPool>,
}

impl std::fmt::Debug for BlockStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockStore")
            .field("ns", &self.ns)
            .field("geometry", &self.geometry)
            .field("shared_pool", &self.pool.as_ref().map(|p| p.id()))
            .finish()
    }
}

impl BlockStore {
    /// Registers `spec` on the daemon behind `client` and checks that its block size is
    /// the geometry's page size. With `mempool_socket`, blocks move through a shared
    /// pool of `pool_blocks` blocks registered there.
    pub async fn open(
        client: Client,
        spec: NamespaceSpec,
        geometry: KvGeometry,
        mempool_socket: Option<&str>,
        pool_blocks: usize,
    ) -> Result<Self> {
        let registered = client.register_namespace(&spec).await?;
        if registered.block_bytes != geometry.block_bytes() as u64 {
            return Err(EngineError::Kv(format!(
                "the daemon sizes this namespace's blocks at {} bytes, the engine's pages are {}",
                registered.block_bytes,
                geometry.block_bytes()
            )));
        }
        let pool = match mempool_socket {
            Some(socket) => {
                let bytes = geometry.block_bytes() * pool_blocks.max(1);
                let name = format!("kvstrata-engine-{}", std::process::id());
                let socket = socket.to_string();
                let pool =
                    tokio::task::spawn_blocking(move || SharedPool::create(&socket, &name, bytes))
                        .await
                        .map_err(|e| EngineError::Kv(format!("pool registration task: {e}")))??;
                Some(pool)
            }
            None => None,
        };
        Ok(BlockStore {
            client,
            spec,
            ns: registered.id,
            geometry,
            pool,
        })
    }

    /// The namespace id (also the first link of every key chain).
    pub fn namespace_id(&self) -> &NamespaceId {
        &self.ns
    }

    /// The namespace spec registered.
    pub fn spec(&self) -> &NamespaceSpec {
        &self.spec
    }

    /// True when blocks move through a shared-memory pool.
    pub fn uses_shared_memory(&self) -> bool {
        self.pool.is_some()
    }

    /// The client, for stats and other calls.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The chained keys of every full block of `tokens`.
    pub fn keys(&self, tokens: &[u32]) -> Vec<BlockHash> {
        block_keys(&self.ns, tokens, self.geometry.block_tokens)
    }

    /// How many leading `keys` are cached, and in which tier (the client
    /// splits a long chain over requests the daemon takes).
    pub async fn lookup(&self, keys: &[BlockHash]) -> Result<(usize, Vec<proto::Tier>)> {
        if keys.is_empty() {
            return Ok((0, Vec::new()));
        }
        let resp = self.client.lookup(&self.ns, keys).await?;
        let matched = (resp.matched as usize).min(keys.len());
        let tiers = resp
            .tiers
            .iter()
            .take(matched)
            .map(|&t| proto::Tier::try_from(t).unwrap_or(proto::Tier::Unspecified))
            .collect();
        Ok((matched, tiers))
    }

    /// Appends the blocks of `keys` to `kv`, in order, stopping at the first one the
    /// daemon no longer has (evicted since the lookup): the caller recomputes from there.
    pub async fn load(&self, keys: &[BlockHash], kv: &mut impl BlockPages) -> Result<LoadReport> {
        let started = Instant::now();
        let mut report = LoadReport::default();
        let block_bytes = self.geometry.block_bytes();
        for chunk in keys.chunks(BLOCKS_PER_BATCH) {
            let complete = match &self.pool {
                Some(pool) => {
                    let mut ranges = Vec::with_capacity(chunk.len());
                    for _ in chunk {
                        ranges.push(pool.alloc(block_bytes)?);
                    }
                    let protos: Vec<_> = ranges.iter().map(|r| r.to_proto()).collect();
                    let results = self.client.batch_get_into(&self.ns, chunk, &protos).await?;
                    let mut all = true;
                    for ((key, result), range) in chunk.iter().zip(&results).zip(&ranges) {
                        if !result.found {
                            all = false;
                            break;
                        }
                        push_checked(kv, key, range.as_slice())?;
                        report.blocks += 1;
                        report.tiers.push(tier_of(result));
                    }
                    all
                }
                None => {
                    let results = self.client.batch_get(&self.ns, chunk).await?;
                    let mut all = results.len() == chunk.len();
                    for (key, result) in chunk.iter().zip(&results) {
                        if !result.found {
                            all = false;
                            break;
                        }
                        push_checked(kv, key, &result.payload)?;
                        report.blocks += 1;
                        report.tiers.push(tier_of(result));
                    }
                    all
                }
            };
            if !complete {
                break;
            }
        }
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Stores full pages `from..keys.len()` of `kv` under `keys` (the chain of the
    /// sequence `kv` holds), each naming the previous key as its parent.
    pub async fn store(
        &self,
        kv: &impl BlockPages,
        keys: &[BlockHash],
        from: usize,
    ) -> Result<StoreReport> {
        let started = Instant::now();
        let mut report = StoreReport::default();
        let end = keys.len().min(kv.full_pages());
        let mut index = from;
        while index < end {
            let batch_end = (index + BLOCKS_PER_BATCH).min(end);
            let parent = |i: usize| (i > 0).then(|| Bytes::copy_from_slice(&keys[i - 1]));
            let resp = match &self.pool {
                Some(pool) => {
                    let mut items = Vec::with_capacity(batch_end - index);
                    let mut ranges = Vec::with_capacity(batch_end - index);
                    for (i, key) in keys.iter().enumerate().take(batch_end).skip(index) {
                        let mut range = pool.alloc(self.geometry.block_bytes())?;
                        range.as_mut_slice().copy_from_slice(&kv.page_bytes(i)?);
                        let mut item =
                            RangePutItem::new(Bytes::copy_from_slice(key), range.to_proto());
                        if let Some(p) = parent(i) {
                            item = item.with_parent(p);
                        }
                        items.push(item);
                        ranges.push(range);
                    }
                    let resp = self.client.batch_put_ranges(&self.ns, items).await?;
                    drop(ranges);
                    resp
                }
                None => {
                    let mut items = Vec::with_capacity(batch_end - index);
                    for (i, key) in keys.iter().enumerate().take(batch_end).skip(index) {
                        let mut item = PutItem::new(
                            Bytes::copy_from_slice(key),
                            Bytes::copy_from_slice(&kv.page_bytes(i)?),
                        );
                        if let Some(p) = parent(i) {
                            item = item.with_parent(p);
                        }
                        items.push(item);
                    }
                    self.client.batch_put(&self.ns, items).await?
                }
            };
            for r in &resp.results {
                match proto::PutStatus::try_from(*r) {
                    Ok(proto::PutStatus::Stored) => report.stored += 1,
                    Ok(proto::PutStatus::NoSpace) => report.no_space += 1,
                    other => {
                        return Err(EngineError::Kv(format!(
                            "the daemon refused a block: {other:?}"
                        )));
                    }
                }
            }
            index = batch_end;
        }
        report.elapsed = started.elapsed();
        Ok(report)
    }
}

fn tier_of(result: &proto::GetResult) -> proto::Tier {
    proto::Tier::try_from(result.tier).unwrap_or(proto::Tier::Unspecified)
}

fn push_checked(kv: &mut impl BlockPages, key: &BlockHash, payload: &[u8]) -> Result<()> {
    let want = kv.block_bytes();
    if payload.len() != want {
        return Err(EngineError::BadBlock {
            key: hex::encode(key),
            reason: format!("{} bytes, the namespace's blocks are {want}", payload.len()),
        });
    }
    kv.push_block(payload)
}
