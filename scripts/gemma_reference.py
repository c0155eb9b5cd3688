#!/usr/bin/env python3
"""Collects llama.cpp's greedy outputs for Gemma 3 270M (testdata/reference/gemma3-270m-greedy.jsonl)
from a running llama-server: for each prompt, its token ids (llama.cpp's tokenizer, BOS added as
the file says), the greedy continuation's ids and text, and the top-5 logprobs of every position.
Completion prompts only (a base model with no chat template); six of them are longer than the
512-token sliding window, so windowed layers matter in prefill and decode.

  gemma_reference.py URL OUT.jsonl
Standard library only. Run through scripts/gemma-reference, which builds and starts the peer.
"""
import json
import sys
import urllib.request

MAX_TOKENS = 48

SHORT = [
    "The Eiffel Tower is located in the city of",
    "The capital of France is",
    "Question: What is the capital of Japan?\nAnswer:",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "The largest planet in our solar system is",
    "In 1969, Neil Armstrong",
    "A haiku about autumn leaves:\n",
    "import numpy as np\n\ndef mean(values):",
    "The French word for cat is",
    "1, 2, 3, 4, 5,",
    "Dear Sir or Madam,\n\nI am writing to",
    "The recipe for pancakes calls for flour, eggs,",
    "Photosynthesis is the process by which",
    "Translate to Spanish: Good morning, how are you?\nSpanish:",
    "The opposite of hot is",
    "Monday, Tuesday, Wednesday,",
    "SELECT name FROM users WHERE",
    "The mitochondria is the powerhouse of",
    "Rust is a programming language that",
    "Ten facts about cats:\n1.",
    "To be or not to be,",
    "The chemical symbol for gold is",
    "Émilie a mangé une pomme et",
]

PARAGRAPHS = [
    "The river wound through the valley, past farms and old stone bridges, carrying leaves and "
    "the occasional boat downstream toward the distant town.",
    "Every morning the baker opened the shop before dawn, lit the ovens and shaped the dough "
    "while the street outside was still dark and quiet.",
    "In the library, rows of tall shelves held books about history, science, travel and art, "
    "and the reading room smelled of paper and polished wood.",
    "The engineers tested the bridge with heavy trucks, measured how far it bent, and wrote "
    "down every number in a thick notebook for the final report.",
]


def long_prompt(i: int) -> str:
    parts = []
    for k in range(30 + 4 * i):
        parts.append(PARAGRAPHS[(k + i) % len(PARAGRAPHS)])
    tails = [" The river", " In the end, the baker", " The library was", " The final report said",
             " After all of this,", " The next morning"]
    return " ".join(parts) + tails[i % len(tails)]


LONG = [long_prompt(i) for i in range(6)]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def record(url: str, rid: str, kind: str, prompt: str) -> dict:
    prompt_ids = post(f"{url}/tokenize", {"content": prompt, "add_special": True})["tokens"]
    out = post(f"{url}/completion", {
        "prompt": prompt_ids, "n_predict": MAX_TOKENS, "temperature": 0, "cache_prompt": False,
        "return_tokens": True, "n_probs": 5,
    })
    top = []
    for p in out.get("completion_probabilities", []):
        top.append({"id": p["id"], "top": [[t["id"], round(t["logprob"], 5)] for t in p["top_logprobs"]]})
    return {
        "id": rid, "mode": "completion", "kind": kind, "prompt": prompt, "max_tokens": MAX_TOKENS,
        "temperature": 0.0, "prompt_token_ids": prompt_ids, "output_token_ids": out["tokens"],
        "output_text": out["content"], "output_top_logprobs": top,
        "finish_reason": "stop" if out.get("stop_type") in ("eos", "word") else "length",
    }


def main():
    url, path = sys.argv[1], sys.argv[2]
    with open(path, "w") as f:
        for i, prompt in enumerate(SHORT):
            f.write(json.dumps(record(url, f"s{i:02d}", "short", prompt), ensure_ascii=False) + "\n")
        for i, prompt in enumerate(LONG):
            f.write(json.dumps(record(url, f"l{i:02d}", "long", prompt), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
