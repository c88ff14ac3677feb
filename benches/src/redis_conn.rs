//! `--mode redis`: the same workload against a Redis server, for comparison.
//!
//! One connection per client task. A put batch is one `MSET` of the batch's
//! keys and payloads, a get batch one `MGET`; keys and payloads are the ones
//! the kvstrata modes use, and every value read back is verified the same way
//! (a `nil` is a miss). Redis answers every `MSET` with `OK`, so every put
//! counts as stored.

use std::time::{Duration, Instant};

use kvstrata_proto::v1::PutStatus;
use redis::Value;
use redis::aio::MultiplexedConnection;

use crate::error::BenchError;
use crate::runner::{Outcome, Shared};

/// How long one command may take before the run fails.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `uds` for `unix://` / `redis+unix://` URLs, `tcp` otherwise.
pub(crate) fn transport(url: &str) -> &'static str {
    let lower = url.trim().to_ascii_lowercase();
    if lower.starts_with("unix:") || lower.contains("+unix:") || lower.starts_with('/') {
        "uds"
    } else {
        "tcp"
    }
}

/// One task's Redis connection.
pub(crate) struct RedisConn {
    conn: MultiplexedConnection,
    url: String,
}

impl RedisConn {
    /// Opens one connection to `url` and checks it with `PING`.
    pub(crate) async fn open(url: &str) -> Result<RedisConn, BenchError> {
        let bad = |source| BenchError::Redis {
            op: "connect",
            url: url.to_string(),
            source,
        };
        // A bare path is a Unix socket, as for --addr.
        let url_owned = if url.starts_with('/') {
            format!("unix://{url}")
        } else {
            url.to_string()
        };
        let client = redis::Client::open(url_owned.as_str()).map_err(bad)?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(bad)?;
        redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .map_err(bad)?;
        Ok(RedisConn {
            conn,
            url: url.to_string(),
        })
    }

    pub(crate) async fn put_batch(
        &mut self,
        sh: &Shared,
        indices: &[u64],
    ) -> Result<Outcome, BenchError> {
        let versions = sh.issue_versions(indices);
        let mut cmd = redis::cmd("MSET");
        for (&i, &v) in indices.iter().zip(&versions) {
            cmd.arg(&sh.keys[i as usize][..])
                .arg(&sh.payloads.block(i, v)[..]);
        }
        let t0 = Instant::now();
        cmd.query_async::<()>(&mut self.conn)
            .await
            .map_err(|source| BenchError::Redis {
                op: "MSET",
                url: self.url.clone(),
                source,
            })?;
        let latency = t0.elapsed();
        let codes = vec![PutStatus::Stored as i32; indices.len()];
        sh.put_outcome("MSET", indices, &versions, latency, &codes)
    }

    pub(crate) async fn get_batch(
        &mut self,
        sh: &Shared,
        indices: &[u64],
    ) -> Result<Outcome, BenchError> {
        let floors = sh.read_floors(indices);
        let mut cmd = redis::cmd("MGET");
        for &i in indices {
            cmd.arg(&sh.keys[i as usize][..]);
        }
        let t0 = Instant::now();
        let reply: Value =
            cmd.query_async(&mut self.conn)
                .await
                .map_err(|source| BenchError::Redis {
                    op: "MGET",
                    url: self.url.clone(),
                    source,
                })?;
        let latency = t0.elapsed();
        let protocol = |reason: String| BenchError::Protocol { op: "MGET", reason };
        let Value::Array(values) = reply else {
            return Err(protocol(format!("answered {reply:?}, not an array")));
        };
        if values.len() != indices.len() {
            return Err(protocol(format!(
                "{} values for {} keys",
                values.len(),
                indices.len()
            )));
        }
        let mut out = Outcome {
            latency,
            blocks: indices.len() as u64,
            ..Outcome::default()
        };
        for ((&i, &floor), v) in indices.iter().zip(&floors).zip(&values) {
            match v {
                Value::Nil => out.misses += 1,
                Value::BulkString(payload) => sh.check_hit(&mut out, i, floor, true, payload),
                other => {
                    return Err(protocol(format!(
                        "key #{i}: answered {}, not a string or nil",
                        kind(other)
                    )));
                }
            }
        }
        Ok(out)
    }
}

/// A short description of an unexpected reply (never its whole payload).
fn kind(v: &Value) -> String {
    match v {
        Value::SimpleString(s) => format!("simple string {s:?}"),
        Value::Int(n) => format!("integer {n}"),
        Value::Array(a) => format!("an array of {}", a.len()),
        other => format!("{:.80}", format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_follows_the_url_scheme() {
        assert_eq!(transport("redis://127.0.0.1:6379"), "tcp");
        assert_eq!(transport("unix:///tmp/redis.sock"), "uds");
        assert_eq!(transport("redis+unix:///tmp/redis.sock"), "uds");
        assert_eq!(transport("/tmp/redis.sock"), "uds");
    }

    #[tokio::test]
    async fn an_absent_server_is_a_connect_error() {
        let dir = std::env::temp_dir().join(format!("kvstrata-redis-none-{}", std::process::id()));
        let e = match RedisConn::open(&format!("unix://{}/none.sock", dir.display())).await {
            Ok(_) => panic!("connected to nothing"),
            Err(e) => e,
        };
        assert!(matches!(e, BenchError::Redis { op: "connect", .. }), "{e}");
        assert!(e.to_string().contains("none.sock"), "{e}");
    }
}
