//! The tokenizer of a GGUF file (`tokenizer.ggml.*`, model `gpt2`: GPT-2
//! byte-level BPE) as a `tokenizers::Tokenizer`, and the chat template.

use candle_core::quantized::gguf_file;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, Tokenizer};

/// The tokenizer plus the ids generation needs.
pub struct GgufTokenizer {
    pub inner: Tokenizer,
    /// End of sequence (`tokenizer.ggml.eos_token_id`).
    pub eos: Option<u32>,
    /// `<|im_end|>`, where the vocabulary has it (ChatML's end of turn).
    pub im_end: Option<u32>,
}

fn strings(ct: &gguf_file::Content, key: &str) -> Result<Vec<String>, String> {
    let v = ct
        .metadata
        .get(key)
        .ok_or_else(|| format!("GGUF metadata has no `{key}`"))?;
    v.to_vec()
        .map_err(|e| format!("`{key}`: {e}"))?
        .iter()
        .map(|s| s.to_string().cloned().map_err(|e| format!("`{key}`: {e}")))
        .collect()
}

fn id(ct: &gguf_file::Content, key: &str) -> Option<u32> {
    ct.metadata.get(key).and_then(|v| v.to_u32().ok())
}

impl GgufTokenizer {
    /// Builds the tokenizer from `tokenizer.ggml.tokens` and `merges`. Token
    /// types 3 (control) and 4 (user-defined) become special tokens, so
    /// `<|im_start|>` in a prompt is one token. The pre-tokenizer is GPT-2's
    /// byte level; for `tokenizer.ggml.pre = smollm` digits are split one by
    /// one first, as SmolLM's own `tokenizer.json` does.
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self, String> {
        let model = ct
            .metadata
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str);
        if model != Some("gpt2") {
            return Err(format!(
                "tokenizer model {model:?}: only GPT-2 byte-level BPE (`gpt2`) is supported"
            ));
        }
        let tokens = strings(ct, "tokenizer.ggml.tokens")?;
        let merges = strings(ct, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| format!("merge `{m}` is not two tokens"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| format!("BPE: {e}"))?;
        let mut inner = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre = ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str);
        let pre_tok: PreTokenizerWrapper = if pre == Some("smollm") {
            Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        } else {
            byte_level.into()
        };
        inner.with_pre_tokenizer(Some(pre_tok));
        inner.with_decoder(Some(DecoderWrapper::from(ByteLevel::default())));
        if let Some(types) = ct
            .metadata
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
        {
            let special: Vec<AddedToken> = types
                .iter()
                .zip(&tokens)
                .filter(|(t, _)| matches!(t.to_i32(), Ok(3 | 4)))
                .map(|(_, tok)| AddedToken::from(tok.clone(), true))
                .collect();
            inner
                .add_special_tokens(special)
                .map_err(|e| format!("special tokens: {e}"))?;
        }
        let im_end = inner.token_to_id("<|im_end|>");
        Ok(Self {
            inner,
            eos: id(ct, "tokenizer.ggml.eos_token_id"),
            im_end,
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| format!("tokenize: {e}"))?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| format!("detokenize: {e}"))
    }

    /// Whether generation stops at `id`.
    pub fn is_stop(&self, id: u32) -> bool {
        Some(id) == self.eos || Some(id) == self.im_end
    }
}

/// The ChatML prompt for one user message, ready for the assistant's
/// answer, with the default system turn the file's chat template adds (for
/// SmolLM2: "You are a helpful AI assistant named SmolLM, ..."), as
/// `apply_chat_template` would. Errors when the template is not ChatML.
pub fn chat_prompt(ct: &gguf_file::Content, user: &str) -> Result<String, String> {
    let template = ct
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .map_or("", String::as_str);
    if !template.contains("<|im_start|>") {
        return Err("--chat: the file's chat template is not ChatML (<|im_start|>)".into());
    }
    const SYS: &str = "<|im_start|>system\n";
    let system = template
        .find(SYS)
        .map(|i| &template[i + SYS.len()..])
        .and_then(|rest| rest.find("<|im_end|>").map(|j| &rest[..j]))
        .filter(|s| !s.contains(['{', '}', '\'', '+']));
    let mut p = String::new();
    if let Some(sys) = system {
        p.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
    }
    p.push_str(&format!(
        "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    ));
    Ok(p)
}
