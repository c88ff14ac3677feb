//! `--mode grpc` (the default): payloads travel inline in `BatchGet` /
//! `BatchPut` messages. Also how the daemon's modes (grpc and shm) open
//! their gRPC clients and register the benchmark's opaque namespace.

use std::time::Instant;

use bytes::Bytes;
use kvstrata_proto::v1::kv_cache_client::KvCacheClient;
use kvstrata_proto::v1::{
    BatchGetRequest, BatchPutRequest, Dtype, Layout, NamespaceSpec, PutItem,
    RegisterNamespaceRequest,
};

use kvstrata_client::BearerToken;
use tonic::transport::Channel;

use crate::args::{BenchArgs, MAX_MESSAGE_BYTES, Plan};
use crate::connect::{Bearer, BearerChannel, client, connect_channel};
use crate::error::BenchError;
use crate::runner::{Outcome, Shared};

/// Model id of the benchmark's namespace.
pub const BENCH_MODEL_ID: &str = "kvstrata-bench";

/// One task's gRPC client: the generated one (registration, the shm mode),
/// and its channel for BatchGet and BatchPut, framed by hand as the client
/// library frames them ([`kvstrata_client::inline`]: put payloads sent as
/// they are, get answers decoded where the frames arrived).
pub(crate) struct Client {
    rpc: KvCacheClient<BearerChannel>,
    channel: BearerChannel,
    /// Payloads of earlier puts, made into the next puts' payloads (only
    /// their header changes) once the transport has let go of them.
    spare: Vec<Bytes>,
}

impl Client {
    fn new(channel: Channel, token: Option<&BearerToken>) -> Client {
        let rpc = client(channel.clone(), token);
        let channel = BearerChannel::new(channel, Bearer(token.cloned()));
        Client {
            rpc,
            channel,
            spare: Vec::new(),
        }
    }

    /// The payload of key index `key` at `version`: a spare block restamped
    /// when one is free again (no copy of the block), else a new one.
    fn payload(&mut self, sh: &Shared, key: u64, version: u64) -> Bytes {
        while let Some(spare) = self.spare.pop() {
            if let Ok(mut block) = spare.try_into_mut()
                && sh.payloads.restamp(&mut block, key, version).is_ok()
            {
                return block.freeze();
            }
        }
        sh.payloads.block(key, version)
    }
}

impl std::ops::Deref for Client {
    type Target = KvCacheClient<BearerChannel>;

    fn deref(&self) -> &Self::Target {
        &self.rpc
    }
}

impl std::ops::DerefMut for Client {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.rpc
    }
}

/// One `BatchPut` of the blocks at `indices`, each with a fresh version.
pub(crate) async fn put_batch(
    client: &mut Client,
    sh: &Shared,
    indices: &[u64],
) -> Result<Outcome, BenchError> {
    let versions = sh.issue_versions(indices);
    let payloads: Vec<Bytes> = indices
        .iter()
        .zip(&versions)
        .map(|(&i, &v)| client.payload(sh, i, v))
        .collect();
    let items = indices
        .iter()
        .zip(&payloads)
        .map(|(&i, payload)| PutItem {
            key: sh.key(i),
            parent: Bytes::new(),
            payload: payload.clone(),
            range: None,
            pages: None,
        })
        .collect();
    let req = BatchPutRequest {
        namespace_id: sh.namespace_id.clone(),
        items,
        ..Default::default()
    };
    let t0 = Instant::now();
    let resp = kvstrata_client::inline::batch_put(
        &mut client.channel,
        tonic::Request::new(req),
        MAX_MESSAGE_BYTES,
    )
    .await
    .map_err(|s| BenchError::rpc("BatchPut", s))?
    .into_inner();
    let latency = t0.elapsed();
    client.spare.extend(payloads);
    sh.put_outcome("BatchPut", indices, &versions, latency, &resp.results)
}

/// One `BatchGet` of the blocks at `indices`; every found block is checked.
pub(crate) async fn get_batch(
    client: &mut Client,
    sh: &Shared,
    indices: &[u64],
) -> Result<Outcome, BenchError> {
    let floors = sh.read_floors(indices);
    let req = BatchGetRequest {
        namespace_id: sh.namespace_id.clone(),
        keys: indices.iter().map(|&i| sh.key(i)).collect(),
        ranges: Vec::new(),
        pages: Vec::new(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let resp = kvstrata_client::inline::batch_get(
        &mut client.channel,
        tonic::Request::new(req),
        MAX_MESSAGE_BYTES,
    )
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
    for ((&i, &floor), r) in indices.iter().zip(&floors).zip(&resp.results) {
        if r.found {
            let key_ok = r.key == sh.keys[i as usize];
            sh.check_hit(&mut out, i, floor, key_ok, &r.payload);
        } else {
            out.misses += 1;
        }
    }
    Ok(out)
}

/// One gRPC client per task (`n`), each on its own connection or, with
/// `--shared-connection`, all on one.
pub(crate) async fn open_clients(args: &BenchArgs, n: usize) -> Result<Vec<Client>, BenchError> {
    // Answers' frame buffers reused, not faulted in afresh per block (as the
    // daemon does for requests).
    kvstrata_client::inline::keep_freed_frame_buffers();
    let mut clients = Vec::with_capacity(n);
    if args.shared_connection {
        let ch = connect_channel(&args.addr).await?;
        clients.extend((0..n).map(|_| Client::new(ch.clone(), args.token.as_ref())));
    } else {
        for _ in 0..n {
            clients.push(Client::new(
                connect_channel(&args.addr).await?,
                args.token.as_ref(),
            ));
        }
    }
    Ok(clients)
}

/// Registers the benchmark's opaque namespace of `plan.block_size` bytes.
pub(crate) async fn register_namespace(
    clients: &mut [Client],
    plan: &Plan,
) -> Result<Bytes, BenchError> {
    let spec = NamespaceSpec {
        model_id: BENCH_MODEL_ID.to_string(),
        dtype: Dtype::F16 as i32,
        layout: Layout::Opaque as i32,
        opaque_block_bytes: plan.block_size as u64,
        tp_rank: 0,
        tp_size: 1,
        ..NamespaceSpec::default()
    };
    let Some(first) = clients.first_mut() else {
        return Err(BenchError::InvalidArg {
            field: "--concurrency",
            reason: "must be at least 1".into(),
        });
    };
    let reg = first
        .register_namespace(RegisterNamespaceRequest {
            spec: Some(spec),
            policy: None,
        })
        .await
        .map_err(|s| BenchError::rpc("RegisterNamespace", s))?
        .into_inner();
    if reg.block_bytes != plan.block_size as u64 {
        return Err(BenchError::Protocol {
            op: "RegisterNamespace",
            reason: format!(
                "block_bytes {} for an opaque namespace of {} bytes",
                reg.block_bytes, plan.block_size
            ),
        });
    }
    if reg.namespace_id.is_empty() {
        return Err(BenchError::Protocol {
            op: "RegisterNamespace",
            reason: "empty namespace_id".into(),
        });
    }
    Ok(reg.namespace_id)
}
