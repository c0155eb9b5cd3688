"""Streaming chat with the official `openai` client against `candela serve`.

    pip install openai
    scripts/serve &                      # or: target/release/candela serve
    python examples/openai_stream.py ["your prompt"]

Set OPENAI_BASE_URL (default http://127.0.0.1:8000/v1) and OPENAI_API_KEY (when the server
runs with --api-key) as usual for the client.
"""

import os
import sys

import openai

client = openai.OpenAI(
    base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
    api_key=os.environ.get("OPENAI_API_KEY", "unused"),
)
prompt = sys.argv[1] if len(sys.argv) > 1 else "Write a haiku about the sea."
model = client.models.list().data[0].id

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": prompt}],
    max_tokens=128,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    if chunk.usage is not None:
        # Candela adds llama.cpp-style timings to the final chunk.
        timings = (chunk.model_extra or {}).get("timings", {})
        print(f"\n\n{chunk.usage.completion_tokens} tokens; TTFT {timings.get('ttft_ms', 0):.1f} ms; "
              f"{timings.get('generation_tokens_per_s', 0):.1f} tokens/s")
