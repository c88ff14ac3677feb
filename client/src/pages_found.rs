//! What a get into KV pages found ([`crate::Client::get_page_ids`]): per key
//! the tier its block came from, and the keys whose pages could not be
//! written. Read from a daemon's compact answer (`BatchGetResponse.tiers`
//! and `failed`) or, from a daemon that answers one `GetResult` per key,
//! from those.

use crate::ClientError;
use crate::proto;

/// What a get into KV pages found, per key, in the request's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PagesFound {
    /// Per key: the tier its block was served from and written into its
    /// pages; `None`: not found, or found but not written (then in
    /// `failed`).
    pub tiers: Vec<Option<proto::Tier>>,
    /// The keys whose blocks could not be written into their pages (an
    /// unknown or closed region, a failed scatter): position and why, in
    /// key order.
    pub failed: Vec<(usize, String)>,
    /// Only from [`crate::Client::get_page_ids_when_queued`]: the daemon
    /// answered once its copies into the pages were queued, and the pages
    /// hold the found blocks once the work before this CUDA IPC event's
    /// latest record has completed (`cudaIpcEventHandle_t`; the same bytes
    /// for every answer about one region). Open it once and wait on it
    /// before reading the pages. `None`: the pages are written already.
    pub ready_event: Option<[u8; 64]>,
}

impl PagesFound {
    /// From one `GetResult` per key (a daemon without compact answers).
    pub fn from_results(results: &[proto::GetResult]) -> PagesFound {
        let mut failed = Vec::new();
        let tiers = results
            .iter()
            .enumerate()
            .map(|(i, r)| {
                if !r.region_error.is_empty() {
                    failed.push((i, r.region_error.clone()));
                }
                r.found.then(|| tier_of(r.tier))
            })
            .collect();
        PagesFound {
            tiers,
            failed,
            ready_event: None,
        }
    }

    /// From a compact answer to a get of `keys` keys; an answer of another
    /// length, or naming a key that is not there, is invalid.
    pub fn from_compact(
        response: proto::BatchGetResponse,
        keys: usize,
    ) -> Result<PagesFound, ClientError> {
        if response.tiers.len() != keys || !response.results.is_empty() {
            return Err(ClientError::InvalidResponse(format!(
                "BatchGet answered {} tiers and {} results for {keys} keys (asked for a compact answer)",
                response.tiers.len(),
                response.results.len()
            )));
        }
        let mut tiers: Vec<Option<proto::Tier>> = response
            .tiers
            .iter()
            .map(|&t| Some(tier_of(t)).filter(|t| *t != proto::Tier::Unspecified))
            .collect();
        let ready_event = match response.pages_ready_event.len() {
            0 => None,
            64 => {
                let mut h = [0u8; 64];
                h.copy_from_slice(&response.pages_ready_event);
                Some(h)
            }
            n => {
                return Err(ClientError::InvalidResponse(format!(
                    "BatchGet answered a pages_ready_event of {n} bytes (a CUDA IPC event handle is 64)"
                )));
            }
        };
        let mut failed = Vec::with_capacity(response.failed.len());
        for f in response.failed {
            let i = f.index as usize;
            if i >= keys {
                return Err(ClientError::InvalidResponse(format!(
                    "BatchGet named key {i} as failed, of {keys} keys"
                )));
            }
            // A failed key was not written, whatever its tier says.
            tiers[i] = None;
            failed.push((i, f.message));
        }
        Ok(PagesFound {
            tiers,
            failed,
            ready_event,
        })
    }

    /// How many leading keys were found and written into their pages.
    pub fn leading_hits(&self) -> usize {
        self.tiers.iter().take_while(|t| t.is_some()).count()
    }

    /// How many keys were found and written, anywhere in the batch.
    pub fn hits(&self) -> usize {
        self.tiers.iter().flatten().count()
    }
}

fn tier_of(t: i32) -> proto::Tier {
    proto::Tier::try_from(t).unwrap_or(proto::Tier::Unspecified)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn result(found: bool, tier: proto::Tier, err: &str) -> proto::GetResult {
        proto::GetResult {
            key: Bytes::from_static(b"k"),
            found,
            payload: Bytes::new(),
            tier: tier as i32,
            region_error: err.to_string(),
        }
    }

    #[test]
    fn compact_and_per_key_answers_read_the_same() {
        let long = [
            result(true, proto::Tier::Hbm, ""),
            result(true, proto::Tier::Host, ""),
            result(false, proto::Tier::Unspecified, ""),
            result(false, proto::Tier::Unspecified, "KV region 9 is closed"),
        ];
        let compact = proto::BatchGetResponse {
            tiers: vec![
                proto::Tier::Hbm as i32,
                proto::Tier::Host as i32,
                0,
                proto::Tier::Unspecified as i32,
            ],
            failed: vec![proto::FailedKey {
                index: 3,
                message: "KV region 9 is closed".into(),
            }],
            ..Default::default()
        };
        let a = PagesFound::from_results(&long);
        let b = PagesFound::from_compact(compact, 4).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.leading_hits(), 2);
        assert_eq!(a.hits(), 2);
        assert_eq!(a.failed, vec![(3, "KV region 9 is closed".to_string())]);
    }

    #[test]
    fn compact_answers_that_do_not_fit_the_request_are_refused() {
        let short = proto::BatchGetResponse {
            tiers: vec![proto::Tier::Hbm as i32],
            ..Default::default()
        };
        let e = PagesFound::from_compact(short, 2).unwrap_err();
        assert!(
            e.to_string().contains("1 tiers and 0 results for 2 keys"),
            "{e}"
        );
        let outside = proto::BatchGetResponse {
            tiers: vec![proto::Tier::Hbm as i32; 2],
            failed: vec![proto::FailedKey {
                index: 2,
                message: "x".into(),
            }],
            ..Default::default()
        };
        let e = PagesFound::from_compact(outside, 2).unwrap_err();
        assert!(e.to_string().contains("key 2 as failed, of 2 keys"), "{e}");
        // A failed key counts as not written even if a tier came with it.
        let both = proto::BatchGetResponse {
            tiers: vec![proto::Tier::Hbm as i32; 2],
            failed: vec![proto::FailedKey {
                index: 0,
                message: "scatter failed".into(),
            }],
            ..Default::default()
        };
        let f = PagesFound::from_compact(both, 2).unwrap();
        assert_eq!(f.tiers, vec![None, Some(proto::Tier::Hbm)]);
        assert_eq!(f.leading_hits(), 0);
        assert_eq!(f.ready_event, None);
    }

    #[test]
    fn an_answer_before_the_copies_names_a_whole_event_handle() {
        let answer = |event: Vec<u8>| proto::BatchGetResponse {
            tiers: vec![proto::Tier::Hbm as i32],
            pages_ready_event: event.into(),
            ..Default::default()
        };
        let handle: Vec<u8> = (0..64).collect();
        let f = PagesFound::from_compact(answer(handle.clone()), 1).unwrap();
        assert_eq!(f.ready_event.map(|h| h.to_vec()), Some(handle));
        assert_eq!(f.hits(), 1);
        let e = PagesFound::from_compact(answer(vec![7; 63]), 1).unwrap_err();
        assert!(
            e.to_string().contains("pages_ready_event of 63 bytes"),
            "{e}"
        );
    }
}
