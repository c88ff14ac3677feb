//! Parsing a routing request: hex block keys, a namespace id, and the JSON body
//! of `POST /route`. Errors are one-line messages naming the bad field.

use bytes::Bytes;
use kvstrata_types::{BlockKey, NamespaceId};
use serde_json::Value;

/// Parses one hex key (`hex:` prefix allowed; 1 to 64 bytes).
pub fn parse_hex_key(s: &str) -> Result<Bytes, String> {
    let t = s.trim();
    let t = t.strip_prefix("hex:").unwrap_or(t);
    let bytes = hex::decode(t).map_err(|e| format!("not hex ({e})"))?;
    BlockKey::new("key", &bytes).map_err(|e| e.to_string())?;
    Ok(Bytes::from(bytes))
}

/// A namespace id given as 32 hex digits; `None` for anything else.
pub fn hex_namespace(arg: &str) -> Option<NamespaceId> {
    let t = arg.trim();
    if t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        NamespaceId::from_hex(t)
    } else {
        None
    }
}

/// Parses a `POST /route` body: `{"namespace_id": hex, "keys": [hex, ...]}`.
pub fn parse_route_request(body: &[u8]) -> Result<(NamespaceId, Vec<Bytes>), String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
    let ns = v
        .get("namespace_id")
        .and_then(Value::as_str)
        .ok_or("namespace_id: missing (a string of 32 hex digits)")?;
    let ns =
        hex_namespace(ns).ok_or_else(|| format!("namespace_id: {ns:?} is not 32 hex digits"))?;
    let keys = v
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("keys: missing (an array of hex strings, parent first)")?;
    let keys = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let s = k
                .as_str()
                .ok_or_else(|| format!("keys[{i}]: not a string"))?;
            parse_hex_key(s).map_err(|e| format!("keys[{i}]: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((ns, keys))
}
