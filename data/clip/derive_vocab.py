#!/usr/bin/env python3
"""Derives the CLIP BPE tokenizer files (vocab.json, merges.txt) shipped in data/clip/ from the public
CLIP BPE file `bpe_simple_vocab_16e6.txt.gz` (found in the open_clip_torch wheel on PyPI, MIT licence,
see LICENSE-open_clip.txt here), exactly as CLIP's SimpleTokenizer builds its encoder:
256 byte-level symbols, the same with a `</w>` word end, then one symbol per merge (the first
49152-256-2 merges), then <|startoftext|> and <|endoftext|>: 49408 entries in all. Hugging Face's
openai/clip-vit-large-patch14 tokenizer (and so SD1.5's tokenizer/ folder) holds the same files.

usage: python derive_vocab.py path/to/bpe_simple_vocab_16e6.txt.gz [out_dir]
"""
import gzip
import json
import os
import sys


def bytes_to_unicode():
    """CLIP's (and GPT-2's) reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def main():
    src = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(os.path.abspath(__file__))
    lines = gzip.open(src).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(" ".join(m) for m in merges) + "\n")


if __name__ == "__main__":
    main()
