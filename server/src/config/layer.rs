//! Laying one configuration layer over another, generically: both are
//! serialized to a JSON tree, the top one's tables are merged key by key into
//! the base's (recursively; a `null` leaves the base value, anything else
//! replaces it), and the result is read back once into the typed struct, so
//! the base's checks (`deny_unknown_fields`, the choices) apply to the
//! merged keys too. JSON rather than TOML because it holds every `u64`.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// `base` with every key that `top` sets replaced by `top`'s value.
/// `top` serializes to a (partial) tree of `base`'s keys, `null` where unset.
pub fn overlay<T, L>(base: &T, top: &L) -> Result<T, serde_json::Error>
where
    T: Serialize + DeserializeOwned,
    L: Serialize,
{
    let mut tree = serde_json::to_value(base)?;
    merge(&mut tree, serde_json::to_value(top)?);
    serde_json::from_value(tree)
}

/// Merges `top` into `base`: tables key by key, other values replace.
fn merge(base: &mut Value, top: Value) {
    match (base, top) {
        (_, Value::Null) => {}
        (Value::Object(base), Value::Object(top)) => {
            for (key, value) in top {
                match base.get_mut(&key) {
                    Some(slot) => merge(slot, value),
                    None if value.is_null() => {}
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, top) => *base = top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        a: u64,
        inner: Inner,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        b: String,
        c: Vec<u32>,
    }

    #[test]
    fn set_keys_replace_and_null_keeps() {
        let base = Outer {
            a: 1,
            inner: Inner {
                b: "file".into(),
                c: vec![1, 2],
            },
        };
        let top = serde_json::json!({ "a": null, "inner": { "b": "flag", "c": null } });
        let merged = overlay(&base, &top).unwrap();
        assert_eq!(merged.a, 1);
        assert_eq!(merged.inner.b, "flag");
        assert_eq!(merged.inner.c, vec![1, 2]);
        let top = serde_json::json!({ "a": u64::MAX, "inner": { "c": [] } });
        let merged = overlay(&base, &top).unwrap();
        assert_eq!(merged.a, u64::MAX);
        assert!(merged.inner.c.is_empty());
        // A key the base does not have is refused by the base's own checks.
        let top = serde_json::json!({ "inner": { "d": 1 } });
        assert!(overlay(&base, &top).is_err());
    }
}
