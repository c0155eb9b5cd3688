"""Regenerates spm_tiny.json: a tiny SentencePiece BPE vocabulary (Llama-style: identity
normalization, dummy prefix, byte fallback) and the ids SentencePiece itself gives for a few
texts. The Rust test builds a GGUF-style `tokenizer.ggml.model = "llama"` vocabulary from it
and must reproduce those ids. Needs `pip install sentencepiece`; run from this directory."""
import io
import json

import sentencepiece as spm

CORPUS = """The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.
A tokenizer splits text into pieces; the pieces become token ids for the model.
Hello world! Hello again, world. Numbers like 12, 345 and 6789 appear here and there.
Café, naïve and déjà vu are borrowed words. Where is the café? It is over there.
    Indented lines, tabs\tand  double  spaces happen in code: def f(x): return x * 2
""" * 20

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space and  double  spaces",
    "line one\nline two\n\nindented:\n    return x * 2",
    "Café déjà vu, naïve!",
    "unknown chars: 你好 🦀 ß",
    "numbers 12345 and 6789",
    "user symbol <tool> inside text",
    "<s>Hello</s> world<tool>",
    "tabs\tand trailing space ",
    "",
]

model = io.BytesIO()
spm.SentencePieceTrainer.train(
    sentence_iterator=iter(CORPUS.splitlines()),
    model_writer=model,
    model_type="bpe",
    vocab_size=420,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
    user_defined_symbols=["<tool>"],
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    character_coverage=1.0,
)
sp = spm.SentencePieceProcessor(model_proto=model.getvalue())


def token_type(i):
    if sp.IsUnknown(i):
        return 2
    if sp.IsControl(i):
        return 3
    if sp.IsByte(i):
        return 6
    if sp.IsUnused(i):
        return 5
    piece = sp.IdToPiece(i)
    return 4 if piece == "<tool>" else 1


SPECIALS = {"<s>": 1, "</s>": 2, "<tool>": 3}


def llama_cpp_ids(text):
    """llama.cpp's SPM encoding (no BOS): special pieces are cut out of the text first and
    every remaining run of text is encoded on its own, each with its own dummy prefix."""
    ids, rest = [], text
    while rest:
        hits = [(rest.find(s), s) for s in SPECIALS if rest.find(s) >= 0]
        if not hits:
            ids += sp.Encode(rest)
            break
        pos, special = min(hits)
        if pos > 0:
            ids += sp.Encode(rest[:pos])
        ids.append(SPECIALS[special])
        rest = rest[pos + len(special):]
    return ids


fixture = {
    "tokens": [sp.IdToPiece(i) for i in range(sp.GetPieceSize())],
    "scores": [sp.GetScore(i) for i in range(sp.GetPieceSize())],
    "token_types": [token_type(i) for i in range(sp.GetPieceSize())],
    "cases": [
        {"text": t, "ids": llama_cpp_ids(t), "sentencepiece_ids": sp.Encode(t)} for t in TEXTS
    ],
}
with open("spm_tiny.json", "w", encoding="utf-8") as f:
    json.dump(fixture, f, ensure_ascii=False, indent=1)
