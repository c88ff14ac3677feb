//! Region calls ([`crate::region::calls`]): a `BatchPut` or `BatchGet` into
//! KV pages, sent on a region's registration connection and run on that
//! connection's thread with the same checks and the same code as over gRPC,
//! without the blocking pool's hop. Only page requests: a put whose items
//! all name `pages`, a get into `pages` or `page_ids`; payloads and pool
//! ranges go over gRPC. The peer passed the region socket's uid check, so it
//! is an admin caller, as a Unix-socket gRPC client is.
//!
//! Counted as `RegionCall.BatchPut` / `RegionCall.BatchGet` in
//! `kvstrata_requests_total`.

use std::time::Instant;

use bytes::Bytes;
use kvstrata_proto::v1 as pb;
use kvstrata_tiers::TierKind;
use kvstrata_types::wire::region_calls::CallKind;
use prost::Message;
use tonic::Status;

use super::KvCacheService;
use super::get::{PagesNamed, check_get};
use super::kv_pages::{PageLists, page_answer, run_page_get};
use super::put::store_put;
use crate::limits::with_thread_cutoff;
use crate::region::calls::{Call, CallAnswer, CallHandler};
use crate::region::io as region_io;
use crate::thread_time::CpuMark;

impl CallHandler for KvCacheService {
    fn call(&self, call: Call<'_>, answer: &mut dyn FnMut(CallAnswer)) {
        let method = match call.kind {
            CallKind::BatchPut => "RegionCall.BatchPut",
            CallKind::BatchGet => "RegionCall.BatchGet",
        };
        if self.shutdown.is_cancelled() {
            self.metrics
                .record_request(method, tonic::Code::Unavailable);
            answer(Err(Status::unavailable("the daemon is shutting down")));
            return;
        }
        // Counted as it is answered (a get may be answered before its
        // copies complete): a client that has its answer sees it counted.
        let mut tell = |a: CallAnswer| {
            let code = a.as_ref().err().map_or(tonic::Code::Ok, Status::code);
            self.metrics.record_request(method, code);
            answer(a);
        };
        let cutoff = call.cutoff;
        let r = with_thread_cutoff(cutoff, || match call.kind {
            CallKind::BatchPut => self
                .region_put(call.body, call.received)
                .map(|r| Some(r.encode_to_vec())),
            CallKind::BatchGet => self.region_get(call.body, call.received, &mut tell),
        });
        match r {
            Ok(Some(body)) => tell(Ok(body)),
            // Told before its copies completed.
            Ok(None) => {}
            Err(s) => tell(Err(s)),
        }
    }
}

impl KvCacheService {
    /// A BatchPut whose items all name KV pages.
    fn region_put(&self, body: &[u8], received: Instant) -> Result<pb::BatchPutResponse, Status> {
        let (began, cpu) = (
            Instant::now(),
            CpuMark::now_if(tracing::enabled!(tracing::Level::DEBUG)),
        );
        let req = pb::BatchPutRequest::decode(body).map_err(|e| {
            Status::invalid_argument(format!(
                "BatchPutRequest: cannot decode the call's body: {e}"
            ))
        })?;
        if let Some(i) = req.items.iter().position(|it| it.pages.is_none()) {
            return Err(Status::invalid_argument(format!(
                "items[{i}].pages: a region call stores blocks from KV pages only; send \
                 payloads and pool ranges over gRPC"
            )));
        }
        let decoded = Instant::now();
        let (ns, parsed) = self.parse_put(req)?;
        let items = parsed.len();
        let checked = Instant::now();
        let results = store_put(&self.cache, &ns, parsed, self.regions.as_deref())?;
        let stored = results
            .iter()
            .filter(|&&r| r == pb::PutStatus::Stored as i32)
            .count() as u32;
        let us = |a: Instant, b: Instant| b.saturating_duration_since(a).as_micros() as u64;
        tracing::debug!(
            items,
            decode_us = us(received, decoded),
            parse_us = us(decoded, checked),
            store_us = us(checked, Instant::now()),
            wall_us = us(began, Instant::now()),
            cpu_us = cpu.us(),
            "region call put (decode: the request's protobuf; parse: items and page lists \
             checked; store: gathers, copies, checksums and publishing; wall and cpu: the \
             thread's wall-clock and CPU time from the decode on, a gap being time it waited)"
        );
        Ok(pb::BatchPutResponse { results, stored })
    }

    /// A BatchGet into KV pages: its answer, or `None` when it was given to
    /// `answer` once the copies were queued (the request asked and could be;
    /// this returns after they complete).
    fn region_get(
        &self,
        body: &[u8],
        received: Instant,
        answer: &mut dyn FnMut(CallAnswer),
    ) -> Result<Option<Vec<u8>>, Status> {
        let (began, cpu) = (
            Instant::now(),
            CpuMark::now_if(tracing::enabled!(tracing::Level::DEBUG)),
        );
        let req = pb::BatchGetRequest::decode(body).map_err(|e| {
            Status::invalid_argument(format!(
                "BatchGetRequest: cannot decode the call's body: {e}"
            ))
        })?;
        let decoded = Instant::now();
        let (ns, keys, how, named) = check_get(&req, self.limits.max_batch)?;
        let pages = match named {
            PagesNamed::Array => PageLists::Array {
                region_id: req.page_region_id,
                page_ids: &req.page_ids,
            },
            PagesNamed::PerKey => PageLists::PerKey(&req.pages),
            PagesNamed::No => {
                return Err(Status::invalid_argument(
                    "pages: a region call reads blocks into KV pages only (`pages` or \
                     `page_ids`); read payloads and into pool ranges over gRPC",
                ));
            }
        };
        let get = self.prepare_page_get(ns, keys, pages)?;
        let checked = Instant::now();
        let early = how.when_queued && get.answers_when_queued();
        let wire_keys = req.keys;
        let mut told_at = None;
        let mut told_cpu = None;
        let mut tell = |found: &[Option<TierKind>], event: Option<[u8; 64]>| {
            if told_at.is_none() {
                told_cpu = Some(cpu.us());
                let outcome = found.iter().map(|t| Ok(*t)).collect();
                let mut response = page_answer(wire_keys.clone(), outcome, how.compact);
                if let Some(event) = event {
                    response.pages_ready_event = Bytes::copy_from_slice(&event);
                }
                answer(Ok(response.encode_to_vec()));
                told_at = Some(Instant::now());
            }
        };
        let outcome = run_page_get(
            &self.cache,
            self.regions.as_deref(),
            &get,
            early.then_some(&mut tell as region_io::TellQueued<'_>),
        )?;
        let read = Instant::now();
        let us = |a: Instant, b: Instant| b.saturating_duration_since(a).as_micros() as u64;
        tracing::debug!(
            keys = get.keys.len(),
            compact = how.compact,
            before_copies = told_at.is_some(),
            decode_us = us(received, decoded),
            check_us = us(decoded, checked),
            read_us = us(checked, told_at.unwrap_or(read)),
            wall_us = us(began, told_at.unwrap_or(read)),
            cpu_us = told_cpu.unwrap_or_else(|| cpu.us()),
            "region call get (decode: the request's protobuf; check: page lists; read: lookups \
             and copies, or, answered before the copies complete (before_copies), until they \
             were queued; wall and cpu: the thread's wall-clock and CPU time from the decode to \
             the answer, a gap being time it waited)"
        );
        if told_at.is_some() {
            return Ok(None);
        }
        Ok(Some(
            page_answer(wire_keys, outcome, how.compact).encode_to_vec(),
        ))
    }
}
