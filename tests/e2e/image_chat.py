"""Image chats for the e2e tests: a chat with image parts through the `openai` client, and
the same chat through our engine alone in this process (the expected greedy tokens)."""

from __future__ import annotations

import base64


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_parts(texts_and_images: list) -> list[dict]:
    """Chat content parts: str items are text, bytes items images (as data URLs)."""
    return [
        {"type": "text", "text": item}
        if isinstance(item, str)
        else {"type": "image_url", "image_url": {"url": data_url(item)}}
        for item in texts_and_images
    ]


def chat(client, parts, max_tokens: int, **kw):
    """One greedy chat (ignore_eos: always `max_tokens` tokens)."""
    model = client.models.list().data[0].id
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": parts}], max_tokens=max_tokens,
        temperature=0, extra_body={"ignore_eos": True}, **kw,
    )  # fmt: skip


def engine_alone(engine, model_dir, parts, images: list[bytes], max_tokens: int):
    """(greedy tokens, prompt tokens) of our Engine in this process for the same chat
    (vision tower included)."""
    from xllm.engine.multimodal import ImageInput
    from xllm.protocol.types import SamplingParams
    from xllm.tokenizer import Tokenizer

    tokenizer = Tokenizer(model_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": parts}], add_generation_prompt=True
    )
    prompt = tokenizer.encode(text, add_special_tokens=False)
    inputs = [ImageInput.from_bytes(data, engine.image_processor) for data in images]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    request_id = f"alone-{len(engine.sequences)}-{id(parts)}"
    engine.add_request(request_id, prompt, params, images=inputs)
    num_prompt = engine.sequences[request_id][0].num_prompt_tokens
    tokens: list[int] = []
    while engine.has_unfinished():
        for delta in engine.step():
            tokens.extend(delta.token_ids)
    return tokens, num_prompt


def expected_text(engine, model_dir, parts, images: list[bytes], max_tokens: int) -> str:
    from xllm.tokenizer import Tokenizer

    tokens, _ = engine_alone(engine, model_dir, parts, images, max_tokens)
    return Tokenizer(model_dir).decode(tokens)
