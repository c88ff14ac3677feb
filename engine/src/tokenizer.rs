//! Text ↔ token ids for the engines.
//!
//! A [`Tokenizer`] is built from a model's GGUF metadata ([`Tokenizer::from_gguf`]) or from
//! a Hugging Face `tokenizer.json` ([`Tokenizer::from_file`]), on top of the `tokenizers`
//! crate. For GGUF only the byte-level BPE family (`tokenizer.ggml.model = "gpt2"`) is
//! supported: a BPE model from `tokenizer.ggml.tokens` + `tokenizer.ggml.merges`, the
//! pre-tokenizer llama.cpp names in `tokenizer.ggml.pre` (the default model's `smollm` is
//! Hugging Face SmolLM2's `Sequence[Digits(individual), ByteLevel(regex)]`), a ByteLevel
//! decoder, and every control / user-defined token added to the added vocabulary so that
//! e.g. `<|im_start|>` in a rendered chat prompt encodes to its single id.
//!
//! [`TokenStream`] turns generated ids back into text one id at a time for streaming
//! output, holding back bytes of a UTF-8 character that is split across tokens.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{EngineError, Result};

/// GGUF `tokenizer.ggml.token_type` of a control token (`<|im_start|>`, `<|endoftext|>`).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF `tokenizer.ggml.token_type` of a user-defined token (matched in raw text, not skipped).
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Token strings that end a turn in common chat formats; their ids join [`Tokenizer::eos_ids`].
const END_OF_TURN_TOKENS: &[&str] = &["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"];

/// Llama 3's pre-tokenizer split (llama.cpp `llama-bpe`): digits in groups of up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: like Llama 3's but digits one at a time.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A loaded tokenizer. Cheap to clone (the vocabulary is shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    add_bos: bool,
    vocab_size: usize,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

fn tok_err(context: &str, err: impl fmt::Display) -> EngineError {
    EngineError::Tokenizer(format!("{context}: {err}"))
}

fn meta<'a>(content: &'a Content, key: &str) -> Option<&'a Value> {
    content.metadata.get(key)
}

fn meta_str<'a>(content: &'a Content, key: &str) -> Result<Option<&'a str>> {
    match meta(content, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(v) => Err(EngineError::Metadata(format!(
            "{key} should be a string, found {:?}",
            v.value_type()
        ))),
    }
}

fn value_as_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => i64::from(*x),
        Value::I8(x) => i64::from(*x),
        Value::U16(x) => i64::from(*x),
        Value::I16(x) => i64::from(*x),
        Value::U32(x) => i64::from(*x),
        Value::I32(x) => i64::from(*x),
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn meta_u32(content: &Content, key: &str) -> Result<Option<u32>> {
    match meta(content, key) {
        None => Ok(None),
        Some(v) => value_as_i64(v)
            .and_then(|x| u32::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| {
                EngineError::Metadata(format!("{key} should be a token id, found {v:?}"))
            }),
    }
}

fn meta_bool(content: &Content, key: &str) -> Result<Option<bool>> {
    match meta(content, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(EngineError::Metadata(format!(
            "{key} should be a bool, found {:?}",
            v.value_type()
        ))),
    }
}

fn meta_array<'a>(content: &'a Content, key: &str) -> Result<Option<&'a [Value]>> {
    match meta(content, key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a.as_slice())),
        Some(v) => Err(EngineError::Metadata(format!(
            "{key} should be an array, found {:?}",
            v.value_type()
        ))),
    }
}

fn meta_strings(content: &Content, key: &str) -> Result<Option<Vec<String>>> {
    let Some(arr) = meta_array(content, key)? else {
        return Ok(None);
    };
    arr.iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(EngineError::Metadata(format!(
                "{key}[{i}] should be a string, found {:?}",
                other.value_type()
            ))),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// The token strings of a GGUF's vocabulary (`tokenizer.ggml.tokens`).
fn gguf_tokens(content: &Content) -> Result<Vec<String>> {
    meta_strings(content, "tokenizer.ggml.tokens")?
        .ok_or_else(|| EngineError::Metadata("tokenizer.ggml.tokens is missing".into()))
}

/// The pre-tokenizer llama.cpp calls `pre` (the value of `tokenizer.ggml.pre`).
fn pre_tokenizer_for(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = |use_regex: bool| ByteLevel::new(false, true, use_regex);
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| tok_err("building the pre-tokenizer split", e))?;
        Ok(Sequence::new(vec![split.into(), byte_level(false).into()]).into())
    };
    match pre {
        // llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM = HF SmolLM/SmolLM2 tokenizer.json.
        "smollm" => {
            Ok(Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into())
        }
        "gpt2" | "default" => Ok(byte_level(true).into()),
        "llama-bpe" | "llama3" => split(LLAMA3_SPLIT),
        "qwen2" => split(QWEN2_SPLIT),
        other => Err(EngineError::Tokenizer(format!(
            "unsupported tokenizer.ggml.pre '{other}' (supported: smollm, gpt2, default, llama-bpe, qwen2)"
        ))),
    }
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(content: &Content) -> Result<Tokenizer> {
        let model = meta_str(content, "tokenizer.ggml.model")?
            .ok_or_else(|| EngineError::Metadata("tokenizer.ggml.model is missing".into()))?;
        if model != "gpt2" {
            return Err(EngineError::Tokenizer(format!(
                "unsupported tokenizer.ggml.model '{model}': only byte-level BPE ('gpt2') is \
                 supported; pass a tokenizer.json instead"
            )));
        }
        let pre = match meta_str(content, "tokenizer.ggml.pre")? {
            Some(p) => p,
            None => {
                tracing::warn!("GGUF has no tokenizer.ggml.pre; using the plain GPT-2 split");
                "default"
            }
        };
        let pre_tokenizer = pre_tokenizer_for(pre)?;

        let tokens = gguf_tokens(content)?;
        let merges_raw = meta_strings(content, "tokenizer.ggml.merges")?
            .ok_or_else(|| EngineError::Metadata("tokenizer.ggml.merges is missing".into()))?;
        let token_types: Vec<i64> = match meta_array(content, "tokenizer.ggml.token_type")? {
            Some(arr) => arr
                .iter()
                .map(|v| {
                    value_as_i64(v).ok_or_else(|| {
                        EngineError::Metadata(format!(
                            "tokenizer.ggml.token_type holds {:?}",
                            v.value_type()
                        ))
                    })
                })
                .collect::<Result<_>>()?,
            None => Vec::new(),
        };
        if !token_types.is_empty() && token_types.len() != tokens.len() {
            return Err(EngineError::Metadata(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                token_types.len(),
                tokens.len()
            )));
        }

        let n_tokens = u32::try_from(tokens.len())
            .map_err(|_| EngineError::Metadata(format!("{} tokens", tokens.len())))?;
        let mut vocab = Vocab::default();
        let mut duplicates = 0usize;
        for (id, tok) in (0..n_tokens).zip(tokens.iter()) {
            // Keep the first id of a duplicated string, as llama.cpp does.
            if vocab.contains_key(tok) {
                duplicates += 1;
            } else {
                vocab.insert(tok.clone(), id);
            }
        }
        if duplicates > 0 {
            tracing::debug!(duplicates, "GGUF vocabulary repeats some token strings");
        }
        let merges: Merges = merges_raw
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        EngineError::Metadata(format!(
                            "tokenizer.ggml.merges[{i}] = {m:?} is not 'a b'"
                        ))
                    })
            })
            .collect::<Result<_>>()?;

        let id_of = |key: &str| -> Result<Option<u32>> {
            match meta_u32(content, key)? {
                Some(id) if id >= n_tokens => Err(EngineError::Metadata(format!(
                    "{key} = {id} is outside the vocabulary of {n_tokens}"
                ))),
                other => Ok(other),
            }
        };
        let bos_id = id_of("tokenizer.ggml.bos_token_id")?;
        let eos_id = id_of("tokenizer.ggml.eos_token_id")?;
        let unk_id = id_of("tokenizer.ggml.unknown_token_id")?;
        let add_bos = meta_bool(content, "tokenizer.ggml.add_bos_token")?.unwrap_or(false);

        // Llama 3 looks a whole pre-token up in the vocabulary before merging (llama.cpp
        // `ignore_merges`, HF `"ignore_merges": true`).
        let ignore_merges = matches!(pre, "llama-bpe" | "llama3");
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges);
        if let Some(unk) = unk_id {
            builder = builder.unk_token(tokens[unk as usize].clone());
        }
        let bpe = builder
            .build()
            .map_err(|e| tok_err("building the BPE model", e))?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevel::default()));
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(token_types.iter())
            .filter(|&(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(tok, &t)| {
                AddedToken::from(tok.clone(), t == TOKEN_TYPE_CONTROL).normalized(false)
            })
            .collect();
        inner
            .add_tokens(added)
            .map_err(|e| tok_err("adding special tokens", e))?;

        Ok(Self::assemble(inner, bos_id, eos_id, add_bos))
    }

    /// Loads a Hugging Face `tokenizer.json`. BOS/EOS and `add_bos_token` come from a
    /// `tokenizer_config.json` next to it when there is one; end-of-turn tokens
    /// (`<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, `</s>`) are recognised by name.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| tok_err(&format!("loading {}", path.display()), e))?;
        let config_path = path.with_file_name("tokenizer_config.json");
        let config: Option<serde_json::Value> = match std::fs::read_to_string(&config_path) {
            Ok(text) => Some(
                serde_json::from_str(&text)
                    .map_err(|e| tok_err(&format!("parsing {}", config_path.display()), e))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(EngineError::io(
                    format!("reading {}", config_path.display()),
                    e,
                ));
            }
        };
        let token_named = |key: &str| -> Option<u32> {
            let v = config.as_ref()?.get(key)?;
            let s = v.as_str().or_else(|| v.get("content")?.as_str())?;
            inner.token_to_id(s)
        };
        let bos_id = token_named("bos_token");
        let eos_id = token_named("eos_token");
        let add_bos = config
            .as_ref()
            .and_then(|c| c.get("add_bos_token")?.as_bool())
            .unwrap_or(false);
        Ok(Self::assemble(inner, bos_id, eos_id, add_bos))
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
        add_bos: bool,
    ) -> Tokenizer {
        let mut eos_ids: Vec<u32> = eos_id.into_iter().collect();
        for name in END_OF_TURN_TOKENS {
            if let Some(id) = inner.token_to_id(name)
                && !eos_ids.contains(&id)
            {
                eos_ids.push(id);
            }
        }
        if eos_ids.is_empty() {
            tracing::warn!(
                "tokenizer has no end-of-sequence token; generation stops only at its length limit"
            );
        }
        let add_bos = add_bos && bos_id.is_some();
        let vocab_size = inner.get_vocab_size(true);
        Tokenizer {
            inner: Arc::new(inner),
            bos_id,
            eos_ids,
            add_bos,
            vocab_size,
        }
    }

    /// Encodes `text`; special tokens written in it (`<|im_start|>`) become their ids.
    /// Prepends BOS only when the model asks for it (`add_bos_token`) and the text does
    /// not already start with it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_fragment(text)?;
        if self.add_bos
            && let Some(bos) = self.bos_id
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Encodes `text` that continues an already tokenized sequence: never adds BOS.
    pub fn encode_fragment(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| tok_err("encoding", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes `ids` to text. With `skip_special`, control tokens (`<|im_end|>`) are left
    /// out. Bytes that are not valid UTF-8 come out as U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(EngineError::Tokenizer(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.vocab_size
            )));
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| tok_err("decoding", e))
    }

    /// A streaming decoder for generated ids (see [`TokenStream`]).
    pub fn stream(&self, skip_special: bool) -> TokenStream {
        TokenStream::new(self.clone(), skip_special)
    }

    /// The beginning-of-sequence id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Whether [`encode`](Self::encode) prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Ids that end generation: the model's EOS first, then `<|im_end|>`, `<|endoftext|>`
    /// (and similar end-of-turn tokens) when present and different.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of one token string (`"<|im_end|>"`), if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id, as stored in the vocabulary (byte-level form).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// Most ids a [`TokenStream`] holds back waiting for a UTF-8 character to complete. A
/// character is at most 4 bytes and every byte-level token is at least one byte, so
/// anything still incomplete after this many is invalid and is let through as U+FFFD.
const MAX_PENDING_IDS: usize = 8;

/// Incremental detokenizer: fed generated ids one at a time, returns the text each
/// completes. Concatenating everything it returns (plus [`finish`](Self::finish)) equals
/// [`Tokenizer::decode`] of all the ids.
///
/// It decodes a short window of recent ids and emits what grew past the previous window's
/// text, so decoders that look at neighbours and characters split across tokens both work.
#[derive(Debug, Clone)]
pub struct TokenStream {
    tok: Tokenizer,
    skip_special: bool,
    /// Context ids (already emitted) followed by ids not yet emitted.
    ids: Vec<u32>,
    /// Decoded text of `ids[..emitted]`.
    prefix: String,
    /// How many of `ids` are already emitted.
    emitted: usize,
}

impl TokenStream {
    /// A stream over `tok`; see [`Tokenizer::stream`].
    pub fn new(tok: Tokenizer, skip_special: bool) -> TokenStream {
        TokenStream {
            tok,
            skip_special,
            ids: Vec::new(),
            prefix: String::new(),
            emitted: 0,
        }
    }

    /// Feeds one id. Returns the newly completed text, or `None` while the id only
    /// started a character (or was a skipped special token).
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids, self.skip_special)?;
        let pending = self.ids.len() - self.emitted;
        if text.len() <= self.prefix.len()
            || (text.ends_with(char::REPLACEMENT_CHARACTER) && pending < MAX_PENDING_IDS)
        {
            return Ok(None);
        }
        let Some(new_text) = text.strip_prefix(self.prefix.as_str()).map(str::to_string) else {
            return Err(EngineError::Tokenizer(format!(
                "streaming decode diverged: {:?} does not extend {:?}",
                text, self.prefix
            )));
        };
        // Keep the ids just emitted as context for the next window.
        self.ids.drain(..self.emitted);
        self.prefix = self.tok.decode(&self.ids, self.skip_special)?;
        self.emitted = self.ids.len();
        Ok(Some(new_text))
    }

    /// Text still held back (an incomplete character at the end), decoded lossily; the
    /// stream is empty afterwards.
    pub fn finish(&mut self) -> Result<String> {
        let text = self.tok.decode(&self.ids, self.skip_special)?;
        let rest = text
            .strip_prefix(self.prefix.as_str())
            .map(str::to_string)
            .unwrap_or_default();
        self.ids.clear();
        self.prefix.clear();
        self.emitted = 0;
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::test_model_path;
    use std::sync::OnceLock;

    /// The default model's tokenizer, loaded once per test process.
    fn smollm() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| {
            let path = test_model_path();
            let mut file = std::fs::File::open(&path).expect("open the default model");
            let content = Content::read(&mut file).expect("read GGUF metadata");
            Tokenizer::from_gguf(&content).expect("build the tokenizer")
        })
    }

    // Cross-checked by hand against Hugging Face's Python `tokenizers` 0.23.3 built from
    // the same GGUF vocab + merges (BPE, Sequence[Digits(individual_digits=True),
    // ByteLevel(add_prefix_space=False)], ByteLevel decoder, the 17 control tokens added
    // as special): every string of CROSS_CHECKED encoded to exactly the ids below.
    const CROSS_CHECKED: &[(&str, &[u32])] = &[
        ("Hello, world!", &[19556, 28, 905, 17]),
        (
            "The year 2024 had 366 days.",
            &[
                504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 38, 2009, 30,
            ],
        ),
        (
            "<|im_start|>user\nCafé 漢字 🦀<|im_end|>\n",
            &[
                1, 4093, 198, 51, 1939, 2756, 17097, 137, 112, 36518, 15107, 116, 218, 2, 198,
            ],
        ),
        (
            "  two  spaces\tand\ttabs\n\n",
            &[216, 827, 216, 5600, 197, 397, 197, 100, 7366, 1116],
        ),
    ];

    #[test]
    fn special_tokens_are_single_ids() {
        let tok = smollm();
        assert_eq!(tok.encode("<|im_start|>").unwrap(), vec![1]);
        assert_eq!(tok.encode("<|im_end|>").unwrap(), vec![2]);
        assert_eq!(tok.encode("<|endoftext|>").unwrap(), vec![0]);
        assert_eq!(tok.bos_id(), Some(1));
        assert!(!tok.adds_bos());
        assert_eq!(tok.eos_ids(), &[2, 0]);
        assert!(tok.is_eos(2));
        assert_eq!(tok.vocab_size(), 49152);
        let ids = tok.encode("<|im_start|>assistant\nHi<|im_end|>").unwrap();
        assert_eq!(ids.first(), Some(&1));
        assert_eq!(ids.last(), Some(&2));
        assert_eq!(tok.decode(&ids, true).unwrap(), "assistant\nHi");
    }

    #[test]
    fn matches_hf_tokenizers() {
        let tok = smollm();
        for (text, ids) in CROSS_CHECKED {
            assert_eq!(tok.encode(text).unwrap(), *ids, "{text:?}");
        }
    }

    #[test]
    fn digits_are_split_individually() {
        let tok = smollm();
        let ids = tok.encode("2024").unwrap();
        assert_eq!(ids.len(), 4);
        let digits: Vec<String> = ids
            .iter()
            .map(|&id| tok.decode(&[id], false).unwrap())
            .collect();
        assert_eq!(digits, ["2", "0", "2", "4"]);
    }

    #[test]
    fn round_trips_exactly() {
        let tok = smollm();
        for text in [
            "plain ASCII text, with punctuation: (a) [b] {c}!",
            "0123456789 and 3.14159",
            "café naïve résumé é",
            "漢字とかな、한국어",
            "emoji 🦀🚄 and ZWJ 👩‍👩‍👧 family",
            "  leading spaces\n\ttabs\r\nand trailing  ",
            "<|im_start|>system\nmixed <|im_end|> specials<|endoftext|>",
        ] {
            let ids = tok.encode(text).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text, "{ids:?}");
        }
    }

    #[test]
    fn stream_concatenation_equals_decode() {
        let tok = smollm();
        let text = "Fares: €4.50 (漢字) 🦀🚄 — ok.<|im_end|>";
        let ids = tok.encode(text).unwrap();
        for skip in [false, true] {
            let mut stream = tok.stream(skip);
            let mut out = String::new();
            let mut held = 0;
            for &id in &ids {
                match stream.step(id).unwrap() {
                    Some(piece) => {
                        assert!(!piece.contains(char::REPLACEMENT_CHARACTER), "{piece:?}");
                        out.push_str(&piece);
                    }
                    None => held += 1,
                }
            }
            out.push_str(&stream.finish().unwrap());
            assert_eq!(out, tok.decode(&ids, skip).unwrap());
            // Multi-byte characters are split across byte-level tokens here.
            assert!(held > 0);
        }
    }

    #[test]
    fn stream_flushes_incomplete_character() {
        let tok = smollm();
        // First token of a split emoji, then nothing: finish hands out the lossy rest.
        let ids = tok.encode("🦀").unwrap();
        assert!(ids.len() > 1);
        let mut stream = tok.stream(false);
        assert_eq!(stream.step(ids[0]).unwrap(), None);
        assert_eq!(
            stream.finish().unwrap(),
            tok.decode(&ids[..1], false).unwrap()
        );
    }

    #[test]
    fn from_file_matches_from_gguf() {
        let tok = smollm();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, tok.inner.to_string(false).unwrap()).unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": false}"#,
        )
        .unwrap();
        let loaded = Tokenizer::from_file(&path).unwrap();
        assert_eq!(loaded.bos_id(), Some(1));
        assert_eq!(loaded.eos_ids(), tok.eos_ids());
        assert_eq!(loaded.vocab_size(), tok.vocab_size());
        for (text, ids) in CROSS_CHECKED {
            assert_eq!(loaded.encode(text).unwrap(), *ids, "{text:?}");
        }
        // Without a config: no BOS known, end-of-turn tokens still found by name.
        std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
        let bare = Tokenizer::from_file(&path).unwrap();
        assert_eq!(bare.bos_id(), None);
        assert_eq!(bare.eos_ids(), &[2, 0]);
        assert!(matches!(
            Tokenizer::from_file(&dir.path().join("missing.json")),
            Err(EngineError::Tokenizer(_))
        ));
    }

    #[test]
    fn decode_rejects_out_of_range_ids() {
        let tok = smollm();
        assert!(matches!(
            tok.decode(&[49152], false),
            Err(EngineError::Tokenizer(_))
        ));
    }

    #[test]
    fn unsupported_model_is_named() {
        let mut content = Content {
            magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
            metadata: Default::default(),
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        };
        content
            .metadata
            .insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        let err = Tokenizer::from_gguf(&content).unwrap_err();
        assert!(
            matches!(&err, EngineError::Tokenizer(m) if m.contains("'llama'")),
            "{err}"
        );
    }

    #[test]
    fn pre_tokenizers_split_as_named() {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let split = |pre: &str, text: &str| -> Vec<String> {
            let pt = pre_tokenizer_for(pre).unwrap();
            let mut s = PreTokenizedString::from(text);
            pt.pre_tokenize(&mut s).unwrap();
            s.get_splits(OffsetReferential::Original, OffsetType::Byte)
                .into_iter()
                .map(|(piece, _, _)| piece.to_string())
                .collect()
        };
        assert_eq!(split("smollm", "in 2024"), ["in", "Ġ", "2", "0", "2", "4"]);
        assert_eq!(split("gpt2", "in 2024"), ["in", "Ġ2024"]);
        assert_eq!(split("llama-bpe", "in 12345"), ["in", "Ġ", "123", "45"]);
        assert_eq!(split("qwen2", "in 123"), ["in", "Ġ", "1", "2", "3"]);
        assert!(
            matches!(pre_tokenizer_for("made-up"), Err(EngineError::Tokenizer(m)) if m.contains("made-up"))
        );
    }
}
