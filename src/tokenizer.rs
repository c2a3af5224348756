//! The CLIP BPE tokenizer of SD1.5, built with the `tokenizers` crate from a vocab.json + merges.txt
//! (SD1.5's `tokenizer/` folder, or the copy of CLIP's vocabulary shipped in `data/clip/`), set up as
//! Hugging Face's CLIPTokenizer is:
//! - normalize: NFC, every whitespace run → one space, lowercase;
//! - pre-split with CLIP's regex (`'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`, the
//!   spaces dropped), then byte-level symbols;
//! - BPE with `</w>` word ends, unknown → `<|endoftext|>`;
//! - `<|startoftext|>` (49406) + at most 75 tokens + `<|endoftext|>` (49407), padded to 77 with
//!   `<|endoftext|>` as SD1.5's tokenizer pads (its pad token is `<|endoftext|>`).

use crate::model::weights::ModelSource;
use anyhow::{anyhow, ensure, Context, Result};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// CLIP's context length: every prompt becomes exactly this many ids.
pub const MAX_LEN: usize = 77;
pub const START_OF_TEXT: &str = "<|startoftext|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";
const CLIP_SPLIT: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
}

/// The folder of the CLIP vocabulary shipped with sdlora (data/clip).
pub fn shipped_vocab_dir() -> PathBuf {
    let local = PathBuf::from("data/clip");
    if local.join("vocab.json").is_file() {
        return local;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/clip")
}

impl ClipTokenizer {
    /// From a folder holding vocab.json and merges.txt.
    pub fn from_dir(dir: &Path) -> Result<ClipTokenizer> {
        ClipTokenizer::from_files(&dir.join("vocab.json"), &dir.join("merges.txt"))
    }

    /// The CLIP vocabulary shipped in data/clip (what SD1.5's tokenizer folder holds).
    pub fn shipped() -> Result<ClipTokenizer> {
        ClipTokenizer::from_dir(&shipped_vocab_dir())
    }

    /// The tokenizer of a model: its `tokenizer/` folder, else (single-file checkpoint) the shipped vocabulary.
    pub fn for_source(src: &ModelSource) -> Result<ClipTokenizer> {
        match src.tokenizer_dir() {
            Some(dir) => ClipTokenizer::from_dir(&dir),
            None => ClipTokenizer::shipped(),
        }
    }

    pub fn from_files(vocab: &Path, merges: &Path) -> Result<ClipTokenizer> {
        for f in [vocab, merges] {
            ensure!(f.is_file(), "CLIP tokenizer file {} not found", f.display());
        }
        let path_str = |p: &Path| p.to_str().map(str::to_string).ok_or_else(|| anyhow!("non-UTF-8 path {}", p.display()));
        let bpe = BPE::from_file(&path_str(vocab)?, &path_str(merges)?)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .unk_token(END_OF_TEXT.into())
            .fuse_unk(false)
            .build()
            .map_err(|e| anyhow!("cannot build the CLIP BPE from {} and {}: {e}", vocab.display(), merges.display()))?;
        let mut inner = Tokenizer::new(bpe);
        let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(|e| anyhow!("{e}"))?;
        inner.with_normalizer(Some(NormSequence::new(vec![NFC.into(), whitespace.into(), Lowercase.into()])));
        let split = Split::new(SplitPattern::Regex(CLIP_SPLIT.into()), SplitDelimiterBehavior::Removed, true).map_err(|e| anyhow!("{e}"))?;
        inner.with_pre_tokenizer(Some(PreSequence::new(vec![split.into(), ByteLevel::new(false, true, true).into()])));
        inner.add_special_tokens(&[AddedToken::from(START_OF_TEXT, true), AddedToken::from(END_OF_TEXT, true)]);
        let id = |t: &str| inner.token_to_id(t).ok_or_else(|| anyhow!("{}: no {t} token in the vocabulary", vocab.display()));
        let (bos, eos) = (id(START_OF_TEXT)?, id(END_OF_TEXT)?);
        Ok(ClipTokenizer { inner, bos, eos })
    }

    /// The BPE ids of `text` with no start/end tokens and no truncation.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing {text:?}: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Exactly [`MAX_LEN`] ids: start, the first 75 BPE ids, end, then end-of-text padding.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let raw = self.encode_raw(text)?;
        let mut ids = Vec::with_capacity(MAX_LEN);
        ids.push(self.bos);
        ids.extend(raw.iter().take(MAX_LEN - 2));
        ids.push(self.eos);
        ids.resize(MAX_LEN, self.eos);
        Ok(ids)
    }

    /// [`encode`](Self::encode) for each prompt, as one `[prompts.len() × 77]` row-major batch.
    pub fn encode_batch(&self, prompts: &[&str]) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(prompts.len() * MAX_LEN);
        for p in prompts {
            out.extend(self.encode(p).with_context(|| format!("prompt {p:?}"))?);
        }
        Ok(out)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fixtures_dir;

    /// Ids equal transformers' CLIPTokenizer's on the committed prompt set (seed captions, >77-token
    /// prompts, punctuation, unicode, odd whitespace, literal special tokens).
    #[test]
    fn ids_match_transformers_clip_tokenizer() {
        let tok = ClipTokenizer::shipped().unwrap();
        assert_eq!(tok.vocab_size(), 49408);
        let text = std::fs::read_to_string(fixtures_dir().join("tokenizer_ids.json")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cases = json["cases"].as_array().unwrap();
        assert!(cases.len() >= 16);
        let mut long = 0;
        for case in cases {
            let prompt = case["prompt"].as_str().unwrap();
            let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            assert_eq!(tok.encode(prompt).unwrap(), want, "prompt {prompt:?}");
            let untruncated = case["untruncated_len"].as_u64().unwrap() as usize;
            assert_eq!(tok.encode_raw(prompt).unwrap().len() + 2, untruncated, "untruncated length of {prompt:?}");
            long += (untruncated > MAX_LEN) as usize;
        }
        assert!(long >= 2, "the prompt set must hold prompts longer than 77 tokens");
    }

    #[test]
    fn known_ids_and_padding() {
        let tok = ClipTokenizer::shipped().unwrap();
        let ids = tok.encode("a photo of a cat").unwrap();
        assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
        assert!(ids[7..].iter().all(|&i| i == 49407) && ids.len() == MAX_LEN);
        assert_eq!(tok.encode_batch(&["x", "y"]).unwrap().len(), 2 * MAX_LEN);
    }

    /// The tiny fixture model's tokenizer folder: a valid CLIP BPE cut to 1000 symbols.
    #[test]
    fn fixture_tokenizer_folder_loads() {
        let src = ModelSource::resolve(fixtures_dir().join("tiny-sd").to_str().unwrap()).unwrap();
        let tok = ClipTokenizer::for_source(&src).unwrap();
        assert_eq!(tok.vocab_size(), 1000);
        let ldm = ModelSource::resolve(fixtures_dir().join("tiny-sd-ldm.safetensors").to_str().unwrap()).unwrap();
        assert_eq!(ClipTokenizer::for_source(&ldm).unwrap().vocab_size(), 49408);
        let ids = tok.encode("A photo of a cat, café!").unwrap();
        assert_eq!((ids[0], *ids.last().unwrap()), (998, 999));
        let err = format!("{:#}", ClipTokenizer::from_dir(&fixtures_dir().join("nowhere")).err().unwrap());
        assert!(err.contains("vocab.json"), "{err}");
    }
}
