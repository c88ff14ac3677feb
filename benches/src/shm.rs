//! `--mode shm`: payloads travel through a shared-memory pool per client task.
//!
//! Each task registers its own [`SharedPool`] on the daemon's mempool socket,
//! sized for one batch, and allocates one block-size [`PoolRange`] per batch slot
//! once. A put copies each payload into its slot's range and sends `BatchPut`
//! with ranges instead of payloads; a get sends `BatchGet` with one range per
//! key, and the daemon writes found blocks there. Reads are verified in the
//! range exactly as the gRPC mode verifies inline payloads; before each get
//! the ranges' headers are zeroed, so a block reported found but never
//! written reads as version 0 and fails verification.

use std::time::Instant;

use bytes::Bytes;
use kvstrata_client::{PoolRange, SharedPool};
use kvstrata_proto::v1::{BatchGetRequest, BatchPutRequest, PutItem, PutStatus};

use crate::error::BenchError;
use crate::grpc_conn::Client;
use crate::payload::HEADER_BYTES;
use crate::runner::{Outcome, Shared};

/// One task's gRPC client, pool and per-slot ranges.
pub(crate) struct ShmConn {
    client: Client,
    ranges: Vec<PoolRange>,
    /// Dropped last: closing it unregisters the pool on the daemon.
    _pool: SharedPool,
}

impl ShmConn {
    /// Registers a pool named `name` of `batch` block-size ranges on `socket`.
    pub(crate) async fn open(
        client: Client,
        socket: &str,
        name: String,
        block_size: usize,
        batch: usize,
    ) -> Result<ShmConn, BenchError> {
        let slot = block_size
            .checked_next_multiple_of(kvstrata_client::pool::RANGE_ALIGN)
            .ok_or_else(|| BenchError::InvalidArg {
                field: "--block-size",
                reason: format!("{block_size} bytes is too large"),
            })?;
        let bytes = slot
            .checked_mul(batch)
            .ok_or_else(|| BenchError::InvalidArg {
                field: "--batch",
                reason: format!("{batch} blocks of {slot} bytes overflow"),
            })?;
        let socket = socket.to_string();
        // Registration blocks (connect, sendmsg, read the id): off the runtime.
        let pool = tokio::task::spawn_blocking(move || SharedPool::create(&socket, &name, bytes))
            .await??;
        let ranges = (0..batch)
            .map(|_| pool.alloc(block_size))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ShmConn {
            client,
            ranges,
            _pool: pool,
        })
    }

    pub(crate) async fn put_batch(
        &mut self,
        sh: &Shared,
        indices: &[u64],
    ) -> Result<Outcome, BenchError> {
        let versions = sh.issue_versions(indices);
        let mut items = Vec::with_capacity(indices.len());
        for ((&i, &v), range) in indices.iter().zip(&versions).zip(&mut self.ranges) {
            sh.payloads
                .write_block(range.as_mut_slice(), i, v)
                .map_err(|e| BenchError::Protocol {
                    op: "BatchPut",
                    reason: format!("range of key #{i}: {e}"),
                })?;
            items.push(PutItem {
                key: sh.key(i),
                parent: Bytes::new(),
                payload: Bytes::new(),
                range: Some(range.to_proto()),
                pages: None,
            });
        }
        if items.len() != indices.len() {
            return Err(too_many(indices.len(), self.ranges.len()));
        }
        let req = BatchPutRequest {
            namespace_id: sh.namespace_id.clone(),
            items,
            ..Default::default()
        };
        let t0 = Instant::now();
        let resp = self
            .client
            .batch_put(req)
            .await
            .map_err(|s| BenchError::rpc("BatchPut", s))?
            .into_inner();
        let latency = t0.elapsed();
        if let Some(pos) = resp
            .results
            .iter()
            .position(|&c| c == PutStatus::BadRegion as i32)
        {
            return Err(BenchError::Protocol {
                op: "BatchPut",
                reason: format!(
                    "BAD_REGION for item {pos} ({:?}) of a registered pool",
                    self.ranges.get(pos).map(PoolRange::to_proto)
                ),
            });
        }
        sh.put_outcome("BatchPut", indices, &versions, latency, &resp.results)
    }

    pub(crate) async fn get_batch(
        &mut self,
        sh: &Shared,
        indices: &[u64],
    ) -> Result<Outcome, BenchError> {
        if indices.len() > self.ranges.len() {
            return Err(too_many(indices.len(), self.ranges.len()));
        }
        let ranges = &mut self.ranges[..indices.len()];
        for r in ranges.iter_mut() {
            if let Some(h) = r.as_mut_slice().get_mut(..HEADER_BYTES) {
                h.fill(0);
            }
        }
        let floors = sh.read_floors(indices);
        let req = BatchGetRequest {
            namespace_id: sh.namespace_id.clone(),
            keys: indices.iter().map(|&i| sh.key(i)).collect(),
            ranges: ranges.iter().map(PoolRange::to_proto).collect(),
            pages: Vec::new(),
            ..Default::default()
        };
        let t0 = Instant::now();
        let resp = self
            .client
            .batch_get(req)
            .await
            .map_err(|s| BenchError::rpc("BatchGet", s))?
            .into_inner();
        let latency = t0.elapsed();
        if resp.results.len() != indices.len() {
            return Err(BenchError::Protocol {
                op: "BatchGet",
                reason: format!("{} results for {} keys", resp.results.len(), indices.len()),
            });
        }
        let mut out = Outcome {
            latency,
            blocks: indices.len() as u64,
            ..Outcome::default()
        };
        for (((&i, &floor), r), range) in indices
            .iter()
            .zip(&floors)
            .zip(&resp.results)
            .zip(ranges.iter())
        {
            if !r.region_error.is_empty() {
                return Err(BenchError::Protocol {
                    op: "BatchGet",
                    reason: format!(
                        "region_error for key #{i} ({:?}) of a registered pool: {}",
                        range.to_proto(),
                        r.region_error
                    ),
                });
            }
            if !r.payload.is_empty() {
                return Err(BenchError::Protocol {
                    op: "BatchGet",
                    reason: format!(
                        "key #{i}: {} payload bytes inline although a range was given",
                        r.payload.len()
                    ),
                });
            }
            if r.found {
                let key_ok = r.key == sh.keys[i as usize];
                sh.check_hit(&mut out, i, floor, key_ok, range.as_slice());
            } else {
                out.misses += 1;
            }
        }
        Ok(out)
    }
}

fn too_many(n: usize, slots: usize) -> BenchError {
    BenchError::Protocol {
        op: "shm",
        reason: format!("{n} blocks for a pool of {slots} slots"),
    }
}
