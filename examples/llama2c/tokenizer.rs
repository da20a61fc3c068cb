//! llama2.c tokenizers (`tokenizer.bin`, `tok512.bin`, ...): a SentencePiece
//! BPE vocabulary exported as `max_token_length: i32`, then per token
//! `score: f32, len: i32, bytes[len]`.
//!
//! Encoding follows llama2.c: an optional BOS (id 1), a dummy-prefix space,
//! one token per UTF-8 character (bytes without a token fall back to the
//! byte tokens `<0xXX>` = id `3 + byte`), then repeated merges of the
//! adjacent pair whose concatenation is the highest-scoring vocabulary entry.
//! Decoding strips the leading space of the first piece after BOS and turns
//! `<0xXX>` pieces into raw bytes.

use std::collections::HashMap;
use std::path::Path;

/// Beginning of sequence.
pub const BOS: usize = 1;

pub struct Tokenizer {
    pieces: Vec<Vec<u8>>,
    scores: Vec<f32>,
    ids: HashMap<Vec<u8>, usize>,
}

impl Tokenizer {
    /// Loads `vocab_size` entries (the model's vocabulary size).
    pub fn load(path: &Path, vocab_size: usize) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_bytes(&bytes, vocab_size).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_bytes(bytes: &[u8], vocab_size: usize) -> Result<Self, String> {
        let mut at = 4; // max_token_length: only a buffer size for the C code
        let word = |what: &str, at: &mut usize| -> Result<[u8; 4], String> {
            let w = bytes
                .get(*at..*at + 4)
                .ok_or_else(|| format!("tokenizer truncated while reading {what} at byte {at}"))?;
            *at += 4;
            Ok([w[0], w[1], w[2], w[3]])
        };
        word("the header", &mut 0)?;
        let mut pieces = Vec::with_capacity(vocab_size);
        let mut scores = Vec::with_capacity(vocab_size);
        let mut ids = HashMap::with_capacity(vocab_size);
        for id in 0..vocab_size {
            let score = f32::from_le_bytes(word("a score", &mut at)?);
            let len = i32::from_le_bytes(word("a length", &mut at)?);
            let len = usize::try_from(len).map_err(|_| format!("token {id}: length {len}"))?;
            let piece = bytes
                .get(at..at + len)
                .ok_or_else(|| format!("tokenizer truncated in token {id}"))?
                .to_vec();
            at += len;
            ids.entry(piece.clone()).or_insert(id);
            pieces.push(piece);
            scores.push(score);
        }
        if vocab_size <= 3 + 255 {
            return Err(format!(
                "a vocabulary of {vocab_size} has no room for the 256 byte tokens"
            ));
        }
        Ok(Self {
            pieces,
            scores,
            ids,
        })
    }

    /// Token ids of `text`, with BOS first when `bos`.
    pub fn encode(&self, text: &str, bos: bool) -> Vec<usize> {
        let mut toks = Vec::new();
        if bos {
            toks.push(BOS);
        }
        if text.is_empty() {
            return toks;
        }
        let start = toks.len();
        if let Some(&space) = self.ids.get(&b" "[..]) {
            toks.push(space);
        }
        let mut buf = [0u8; 4];
        for ch in text.chars() {
            let s = ch.encode_utf8(&mut buf).as_bytes();
            match self.ids.get(s) {
                Some(&id) => toks.push(id),
                None => toks.extend(s.iter().map(|&b| 3 + usize::from(b))),
            }
        }
        // Merge the best-scoring adjacent pair until no pair is in the vocabulary.
        loop {
            let mut best: Option<(f32, usize, usize)> = None;
            for i in start..toks.len().saturating_sub(1) {
                let mut pair = self.pieces[toks[i]].clone();
                pair.extend_from_slice(&self.pieces[toks[i + 1]]);
                if let Some(&id) = self.ids.get(&pair)
                    && best.is_none_or(|(s, _, _)| self.scores[id] > s)
                {
                    best = Some((self.scores[id], i, id));
                }
            }
            let Some((_, i, id)) = best else { break };
            toks[i] = id;
            toks.remove(i + 1);
        }
        toks
    }

    /// The bytes `token` prints after `prev` (empty for unprintable single
    /// bytes, as llama2.c's `safe_printf`).
    pub fn decode(&self, prev: usize, token: usize) -> Result<Vec<u8>, String> {
        let piece = self
            .pieces
            .get(token)
            .ok_or_else(|| format!("token {token} is outside the vocabulary"))?;
        let mut p: &[u8] = piece;
        if prev == BOS && p.first() == Some(&b' ') {
            p = &p[1..];
        }
        let byte;
        if let Some(b) = byte_token(p) {
            byte = [b];
            p = &byte;
        }
        // llama2.c skips unprintable single bytes; bytes >= 0x80 are kept
        // here (llama2.c drops them too) so multi-byte UTF-8 text survives.
        if let [b] = p
            && b.is_ascii()
            && !(b.is_ascii_graphic() || b.is_ascii_whitespace() || *b == b' ' || *b == 0x0b)
        {
            return Ok(Vec::new());
        }
        Ok(p.to_vec())
    }
}

/// `<0xXX>` → the byte `XX`.
fn byte_token(p: &[u8]) -> Option<u8> {
    let hex = p.strip_prefix(b"<0x")?.strip_suffix(b">")?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}
