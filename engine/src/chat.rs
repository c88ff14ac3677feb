//! Chat prompts: the model's chat template and multi-turn conversations.
//!
//! [`ChatTemplate`] renders a list of [`Message`]s into prompt text with the Jinja template a
//! GGUF carries in `tokenizer.chat_template` (falling back to plain ChatML), the way Hugging
//! Face's `apply_chat_template` does: `messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token` and `raise_exception(msg)` are in scope, blocks are trimmed
//! (`trim_blocks`, `lstrip_blocks`), and a few Python string / dict methods common in
//! templates (`strip`, `startswith`, `items`, ...) work.
//!
//! [`Conversation`] keeps the token ids of a multi-turn chat so that each new prompt starts
//! with *exactly* the tokens of the previous prompt and the generated answer — the KV blocks
//! computed for them stay reusable — and only the newly rendered text is tokenized.

use candle_core::quantized::gguf_file::{Content, Value};
use minijinja::value::ValueKind;
use minijinja::{Environment, ErrorKind, State, context};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::tokenizer::Tokenizer;

/// Plain ChatML, used when a model carries no template of its own.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat";

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Message {
        Message::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Message {
        Message::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Message {
        Message::new("assistant", content)
    }
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

fn template_err(context: &str, err: &minijinja::Error) -> EngineError {
    // `{:#}` adds what minijinja knows of where in the template it failed.
    EngineError::ChatTemplate(format!("{context}: {err:#}"))
}

/// Python `str` / `dict` methods that Hugging Face chat templates call and minijinja lacks.
fn python_method(
    _state: &State,
    value: &minijinja::Value,
    method: &str,
    args: &[minijinja::Value],
) -> std::result::Result<minijinja::Value, minijinja::Error> {
    use minijinja::value::from_args;
    let unknown = || minijinja::Error::from(ErrorKind::UnknownMethod);
    match value.kind() {
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            match method {
                "strip" | "lstrip" | "rstrip" => {
                    // Python: no argument strips whitespace, a string strips those chars.
                    let (set,): (Option<&str>,) = from_args(args)?;
                    let pred = |c: char| match set {
                        None => c.is_whitespace(),
                        Some(set) => set.contains(c),
                    };
                    Ok(match method {
                        "strip" => s.trim_matches(pred),
                        "lstrip" => s.trim_start_matches(pred),
                        _ => s.trim_end_matches(pred),
                    }
                    .into())
                }
                "startswith" | "endswith" => {
                    let (pat,): (&str,) = from_args(args)?;
                    Ok(if method == "startswith" {
                        s.starts_with(pat)
                    } else {
                        s.ends_with(pat)
                    }
                    .into())
                }
                "upper" => Ok(s.to_uppercase().into()),
                "lower" => Ok(s.to_lowercase().into()),
                "replace" => {
                    let (from, to): (&str, &str) = from_args(args)?;
                    Ok(s.replace(from, to).into())
                }
                "split" => {
                    let (sep,): (Option<&str>,) = from_args(args)?;
                    let parts: Vec<minijinja::Value> = match sep {
                        Some(sep) => s.split(sep).map(minijinja::Value::from).collect(),
                        None => s.split_whitespace().map(minijinja::Value::from).collect(),
                    };
                    Ok(parts.into())
                }
                _ => Err(unknown()),
            }
        }
        ValueKind::Map => match method {
            "items" => {
                let _: () = from_args(args)?;
                let items: Vec<minijinja::Value> = value
                    .try_iter()?
                    .map(|k| {
                        let v = value.get_item(&k).unwrap_or_default();
                        minijinja::Value::from(vec![k, v])
                    })
                    .collect();
                Ok(items.into())
            }
            "keys" => {
                let _: () = from_args(args)?;
                Ok(value.try_iter()?.collect::<Vec<_>>().into())
            }
            "values" => {
                let _: () = from_args(args)?;
                let vals: Vec<minijinja::Value> = value
                    .try_iter()?
                    .map(|k| value.get_item(&k).unwrap_or_default())
                    .collect();
                Ok(vals.into())
            }
            "get" => {
                let (key, default): (minijinja::Value, Option<minijinja::Value>) = from_args(args)?;
                let v = value.get_item(&key)?;
                Ok(if v.is_undefined() {
                    default.unwrap_or(minijinja::Value::from(()))
                } else {
                    v
                })
            }
            _ => Err(unknown()),
        },
        _ => Err(unknown()),
    }
}

impl ChatTemplate {
    /// Compiles a Jinja chat template; `bos_token` / `eos_token` are the strings the
    /// template may print.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<ChatTemplate> {
        let source = source.into();
        let mut env = Environment::new();
        // What transformers' apply_chat_template sets up.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.set_unknown_method_callback(python_method);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| template_err("parsing the template", &e))?;
        Ok(ChatTemplate {
            env,
            source,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// Plain ChatML ([`CHATML_TEMPLATE`]).
    pub fn chatml() -> Result<ChatTemplate> {
        ChatTemplate::new(CHATML_TEMPLATE, "", "<|im_end|>")
    }

    /// The template in a GGUF's `tokenizer.chat_template`, with its BOS/EOS token strings;
    /// plain ChatML (with a warning) when the GGUF has none.
    pub fn from_gguf(content: &Content) -> Result<ChatTemplate> {
        // The string of the token whose id is at `key` ("" when the model has none).
        let token = |key: &str| -> Result<String> {
            let Some(id) = content.metadata.get(key) else {
                return Ok(String::new());
            };
            let id = id
                .to_u64()
                .ok()
                .and_then(|id| usize::try_from(id).ok())
                .ok_or_else(|| EngineError::Metadata(format!("{key} is not a token id")))?;
            let tokens = match content.metadata.get("tokenizer.ggml.tokens") {
                Some(Value::Array(tokens)) => tokens,
                _ => {
                    return Err(EngineError::Metadata(
                        "tokenizer.ggml.tokens is missing".into(),
                    ));
                }
            };
            match tokens.get(id) {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(EngineError::Metadata(format!(
                    "{key} = {id} is not a token of the vocabulary"
                ))),
            }
        };
        let bos = token("tokenizer.ggml.bos_token_id")?;
        let eos = token("tokenizer.ggml.eos_token_id")?;
        match content.metadata.get("tokenizer.chat_template") {
            Some(Value::String(source)) => ChatTemplate::new(source.clone(), bos, eos),
            Some(other) => Err(EngineError::Metadata(format!(
                "tokenizer.chat_template should be a string, found {:?}",
                other.value_type()
            ))),
            None => {
                tracing::warn!(
                    "the model has no tokenizer.chat_template; falling back to plain ChatML"
                );
                ChatTemplate::new(CHATML_TEMPLATE, bos, eos)
            }
        }
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// answer should begin.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| template_err("loading the template", &e))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| template_err("rendering", &e))
    }
}

/// A multi-turn chat whose prompt tokens only ever grow at the end.
///
/// Turn by turn: [`next_prompt_tokens`](Self::next_prompt_tokens) with the user's text gives
/// the full prompt; the engine generates; [`record_answer`](Self::record_answer) with the
/// generated ids (usually ending in `<|im_end|>`) and their text. The next prompt then begins
/// with every token of the previous prompt and answer, verbatim, so their KV blocks are
/// reused; only the text the template added since is tokenized. Because control tokens
/// split tokenization, tokenizing that suffix alone gives the same ids as tokenizing the
/// whole rendering. If the template rewrites earlier text (not prefix-stable), the
/// conversation keeps the longest still-valid part and re-tokenizes the rest, with a
/// warning.
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    messages: Vec<Message>,
    /// Every token so far: prompts and recorded answers.
    tokens: Vec<u32>,
    /// The text `tokens` stand for (answers as their ids decode, specials included).
    text: String,
    /// `(tokens, text bytes)` positions where `tokens[..t]` is exactly `text[..b]`:
    /// after each prompt and answer, and before an answer's final end-of-turn token.
    checkpoints: Vec<(usize, usize)>,
    /// Index in `tokens` where an answer recorded but not yet folded into `text` starts.
    pending_answer: Option<usize>,
    /// Tokens the last prompt kept from before.
    last_kept: usize,
}

impl Conversation {
    /// An empty conversation (the template may add its default system prompt).
    pub fn new() -> Conversation {
        Conversation::default()
    }

    /// A conversation that starts with a system message.
    pub fn with_system(system: impl Into<String>) -> Conversation {
        Conversation {
            messages: vec![Message::system(system)],
            ..Conversation::default()
        }
    }

    /// The messages so far.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Every token so far (the last prompt plus a recorded answer).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// How many tokens of the last prompt were kept verbatim from the turn before.
    pub fn last_kept(&self) -> usize {
        self.last_kept
    }

    /// Appends the user's message and returns the full token sequence of the next prompt
    /// (ending with the generation prompt). The previous prompt and recorded answer are kept
    /// as its prefix whenever the template allows.
    pub fn next_prompt_tokens(
        &mut self,
        tok: &Tokenizer,
        template: &ChatTemplate,
        user: &str,
    ) -> Result<Vec<u32>> {
        // Fold a recorded answer's text in first; fail before changing anything.
        let answer_text = match self.pending_answer {
            Some(start) => Some(self.answer_span(tok, start)?),
            None => None,
        };
        self.messages.push(Message::user(user));
        let rendered = match template.render(&self.messages, true) {
            Ok(r) => r,
            Err(e) => {
                self.messages.pop();
                return Err(e);
            }
        };
        if let Some((text, before_eos)) = answer_text {
            if let Some(b) = before_eos {
                self.checkpoints
                    .push((self.tokens.len() - 1, self.text.len() + b));
            }
            self.text.push_str(&text);
            self.checkpoints.push((self.tokens.len(), self.text.len()));
            self.pending_answer = None;
        }

        let common = self
            .text
            .bytes()
            .zip(rendered.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        let (keep_tokens, keep_bytes) = self
            .checkpoints
            .iter()
            .rev()
            .find(|&&(_, b)| b <= common && rendered.is_char_boundary(b))
            .copied()
            .unwrap_or((0, 0));
        if keep_tokens < self.tokens.len() {
            tracing::warn!(
                kept = keep_tokens,
                had = self.tokens.len(),
                "chat template output does not extend the previous turn; re-tokenizing from the \
                 last point it still matches"
            );
        }
        let suffix = &rendered[keep_bytes..];
        let new_ids = if keep_tokens == 0 {
            tok.encode(suffix)
        } else {
            tok.encode_fragment(suffix)
        };
        let new_ids = match new_ids {
            Ok(ids) => ids,
            Err(e) => {
                self.messages.pop();
                return Err(e);
            }
        };
        self.tokens.truncate(keep_tokens);
        self.checkpoints.retain(|&(t, _)| t <= keep_tokens);
        self.tokens.extend_from_slice(&new_ids);
        self.text = rendered;
        self.checkpoints.push((self.tokens.len(), self.text.len()));
        self.last_kept = keep_tokens;
        Ok(self.tokens.clone())
    }

    /// Records the assistant's answer to the last prompt: `answer_ids` exactly as generated
    /// (including a final end-of-turn token such as `<|im_end|>`, if it was generated) and
    /// `answer_text`, the answer's content as shown to the user (without that token).
    pub fn record_answer(&mut self, answer_ids: &[u32], answer_text: &str) {
        if self.pending_answer.is_none() {
            self.pending_answer = Some(self.tokens.len());
        }
        self.tokens.extend_from_slice(answer_ids);
        match self.messages.last_mut() {
            Some(last) if last.role == "assistant" => last.content.push_str(answer_text),
            _ => self.messages.push(Message::assistant(answer_text)),
        }
    }

    /// The text of the answer tokens from `start`, and, when they end with an end-of-turn
    /// token, the byte length of the text before it.
    fn answer_span(&self, tok: &Tokenizer, start: usize) -> Result<(String, Option<usize>)> {
        let ids = &self.tokens[start..];
        let text = tok.decode(ids, false)?;
        let before_eos = match ids.split_last() {
            Some((&last, rest)) if tok.is_eos(last) && !rest.is_empty() => {
                let head = tok.decode(rest, false)?;
                text.starts_with(&head).then_some(head.len())
            }
            _ => None,
        };
        Ok((text, before_eos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::test_model_path;
    use std::sync::OnceLock;

    fn model() -> &'static (Tokenizer, ChatTemplate) {
        static MODEL: OnceLock<(Tokenizer, ChatTemplate)> = OnceLock::new();
        MODEL.get_or_init(|| {
            let path = test_model_path();
            let mut file = std::fs::File::open(&path).expect("open the default model");
            let content = Content::read(&mut file).expect("read GGUF metadata");
            (
                Tokenizer::from_gguf(&content).expect("tokenizer"),
                ChatTemplate::from_gguf(&content).expect("chat template"),
            )
        })
    }

    #[test]
    fn renders_smollm_chatml_with_default_system_prompt() {
        let (_, tmpl) = model();
        let messages = [
            Message::user("What does Larkspur Rail charge for a bike?"),
            Message::assistant("A bike ticket costs 2.40."),
        ];
        let expected = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
<|im_start|>user\nWhat does Larkspur Rail charge for a bike?<|im_end|>\n\
<|im_start|>assistant\nA bike ticket costs 2.40.<|im_end|>\n";
        assert_eq!(tmpl.render(&messages, false).unwrap(), expected);
        assert_eq!(
            tmpl.render(&messages, true).unwrap(),
            format!("{expected}<|im_start|>assistant\n")
        );
        // An explicit system message replaces the default one.
        let with_system = [Message::system("Be brief."), Message::user("Hi")];
        assert_eq!(
            tmpl.render(&with_system, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_and_python_methods() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}\
             {{ bos_token }}{% for m in messages %}[{{ m.content.strip() | upper }}|{{ m.role.startswith('us') }}]{% endfor %}{{ eos_token }}",
            "<s>",
            "</s>",
        )
        .unwrap();
        assert_eq!(
            t.render(&[Message::user("  hi \n")], false).unwrap(),
            "<s>[HI|True]</s>" // Jinja prints booleans the Python way
        );
        let err = t.render(&[Message::assistant("x")], false).unwrap_err();
        assert!(
            matches!(&err, EngineError::ChatTemplate(m) if m.contains("first message must be from the user")),
            "{err}"
        );
        let items = ChatTemplate::new(
            "{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}{{ {'b': 2}.get('c', 3) }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(items.render(&[], false).unwrap(), "a=13");
        assert!(matches!(
            ChatTemplate::new("{% for %}", "", ""),
            Err(EngineError::ChatTemplate(_))
        ));
    }

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::chatml().unwrap();
        assert_eq!(
            t.render(&[Message::user("Hi")], true).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    /// Answer ids the way a model produces them: the answer's tokens, then `<|im_end|>`.
    fn answer(tok: &Tokenizer, text: &str) -> Vec<u32> {
        let mut ids = tok.encode(text).unwrap();
        ids.push(2);
        ids
    }

    #[test]
    fn conversation_tokens_only_grow() {
        let (tok, tmpl) = model();
        let mut conv = Conversation::new();
        let turns = [
            (
                "How often do trains run on the Harbour Line?",
                "Every 12 minutes at peak, 20 off-peak.",
            ),
            (
                "And on Sundays?",
                "Every 30 minutes, from 07:00 to 23:30. 漢字 ok 🚄",
            ),
            (
                "What does a bike ticket cost?",
                "  A bike ticket is 2.40 and valid all day.\n",
            ),
        ];
        let mut previous: Vec<u32> = Vec::new();
        for (i, (question, reply)) in turns.iter().enumerate() {
            let prompt = conv.next_prompt_tokens(tok, tmpl, question).unwrap();
            assert!(prompt.starts_with(&previous), "turn {i} lost its prefix");
            assert_eq!(conv.last_kept(), previous.len());
            // The kept prefix plus the new suffix is exactly the full tokenization.
            let rendered = tmpl.render(conv.messages(), true).unwrap();
            assert_eq!(prompt, tok.encode(&rendered).unwrap(), "turn {i}");
            let ids = answer(tok, reply);
            conv.record_answer(&ids, reply);
            assert_eq!(conv.tokens(), [prompt, ids].concat());
            previous = conv.tokens().to_vec();
        }
        let last = conv.next_prompt_tokens(tok, tmpl, "Thanks!").unwrap();
        assert!(last.starts_with(&previous));
        assert_eq!(conv.messages().len(), 7);
    }

    #[test]
    fn conversation_keeps_non_canonical_answer_tokens() {
        // Models may produce tokenizations the tokenizer itself would not; they are kept.
        let (tok, tmpl) = model();
        let mut conv = Conversation::with_system("Answer briefly.");
        conv.next_prompt_tokens(tok, tmpl, "Spell it").unwrap();
        let mut ids: Vec<u32> = "fares"
            .chars()
            .flat_map(|c| tok.encode(&c.to_string()).unwrap())
            .collect();
        ids.push(2);
        conv.record_answer(&ids, "fares");
        let before = conv.tokens().to_vec();
        let next = conv.next_prompt_tokens(tok, tmpl, "Again").unwrap();
        assert!(next.starts_with(&before));
        assert_ne!(
            next,
            tok.encode(&tmpl.render(conv.messages(), true).unwrap())
                .unwrap()
        );
    }

    #[test]
    fn conversation_answer_without_or_with_other_eos() {
        let (tok, tmpl) = model();
        // Cut off by a length limit: no <|im_end|> generated; everything is still kept.
        let mut conv = Conversation::new();
        conv.next_prompt_tokens(tok, tmpl, "Tell me a long story")
            .unwrap();
        let ids = tok.encode("Once upon a time").unwrap();
        conv.record_answer(&ids, "Once upon a time");
        let before = conv.tokens().to_vec();
        let next = conv.next_prompt_tokens(tok, tmpl, "Go on").unwrap();
        assert!(next.starts_with(&before));

        // Ended with <|endoftext|> (another eos id): the answer's content tokens are kept,
        // the stray end token is replaced by what the template renders.
        let mut conv = Conversation::new();
        let prompt = conv.next_prompt_tokens(tok, tmpl, "Hi").unwrap();
        let mut ids = tok.encode("Hello there").unwrap();
        let content_len = prompt.len() + ids.len();
        ids.push(0);
        conv.record_answer(&ids, "Hello there");
        let before = conv.tokens()[..content_len].to_vec();
        let next = conv.next_prompt_tokens(tok, tmpl, "Bye").unwrap();
        assert!(next.starts_with(&before));
        assert_eq!(conv.last_kept(), content_len);
        assert_eq!(next[content_len], 2);
    }

    #[test]
    fn rag_demo_conversation_grows_past_2000_tokens() {
        let (tok, tmpl) = model();
        let docs = [
            include_str!("../data/rag/01-larkspur-timetable-policy.txt"),
            include_str!("../data/rag/02-larkspur-fare-rules.txt"),
            include_str!("../data/rag/03-larkspur-maintenance-handbook.txt"),
            include_str!("../data/rag/04-larkspur-passenger-assistance.txt"),
        ];
        let questions: Vec<&str> = include_str!("../data/rag/questions.txt")
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(questions.len(), 6);
        let mut conv = Conversation::with_system(format!(
            "Answer from these documents.\n\n{}",
            docs.join("\n\n")
        ));
        let mut previous = Vec::new();
        for q in &questions {
            let prompt = conv.next_prompt_tokens(tok, tmpl, q).unwrap();
            assert!(prompt.starts_with(&previous));
            conv.record_answer(&answer(tok, "See the documents."), "See the documents.");
            previous = conv.tokens().to_vec();
        }
        assert!(previous.len() > 2000, "{} tokens", previous.len());
    }

    #[test]
    fn conversation_recovers_from_non_prefix_template() {
        // A template that shows only the last user message is not prefix-stable.
        let (tok, _) = model();
        let tmpl = ChatTemplate::new(
            "{{ '<|im_start|>user\n' + messages[-1]['content'] + '<|im_end|>\n<|im_start|>assistant\n' }}",
            "",
            "",
        )
        .unwrap();
        let mut conv = Conversation::new();
        conv.next_prompt_tokens(tok, &tmpl, "first").unwrap();
        conv.record_answer(&answer(tok, "one"), "one");
        let next = conv.next_prompt_tokens(tok, &tmpl, "second").unwrap();
        assert_eq!(
            next,
            tok.encode("<|im_start|>user\nsecond<|im_end|>\n<|im_start|>assistant\n")
                .unwrap()
        );
        // Checkpoints sit at turn ends, so nothing before "second" could be kept.
        assert_eq!(conv.last_kept(), 0);
    }
}
