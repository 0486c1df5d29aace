"""`nlc sample`: generate from a trained model, streaming tokens as they come.

The prompt is prefilled in one forward pass (the model's chunked form over the whole prompt); then
each token is chosen from the last position's logits (temperature, top-k, a seeded generator),
printed, and fed back alone with the state carried, so a token costs one step of every memory,
not a pass over the whole text. A model trained on text prints bytes (decoded as UTF-8 as they
come, with U+FFFD for what is not); a model trained on a synthetic task prints token ids, and its
prompt is token ids too (`--prompt "3 17 0"`; text is read as bytes).

Feeding the text token by token with the state carried gives the logits of one forward pass over
the whole text exactly (to rounding), for every model nlc generates: attention carries its KV
cache, matrix memories need nothing more (their chunked forms are exact for any chunk), MLP and
momentum memories carry the open chunk's anchor and offset (their chunks start at absolute
positions), and CMS models carry the open window, its tokens and the state at its start, and run
it again from there at the next token (so a streamed token of a CMS model costs up to a window of
tokens). A model whose generated source cannot be checked gets a note on stderr that streaming it
may be approximate (`nlc.runtime.evaluate.approximations`).
"""
from __future__ import annotations

import codecs
import re
import time
from typing import Callable, Iterator

from nlc.runtime.evaluate import EvalError, Run, approximations


def prompt_ids(text: str, vocab: int, token_ids: bool) -> list[int]:
    """The prompt's token ids: `token_ids` (a task model) reads "3 17 0" (spaces or commas) as ids;
    anything else is its UTF-8 bytes. Each must be in the vocabulary."""
    if not text:
        raise EvalError("--prompt is empty: give at least one token")
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    if token_ids and parts and all(p.isdigit() for p in parts):
        ids = [int(p) for p in parts]
        for i, v in enumerate(ids):
            if v >= vocab:
                raise EvalError(f"--prompt: token id {v} (item {i + 1}) is outside the model's vocabulary of "
                                f"{vocab} ids (0 to {vocab - 1})")
        return ids
    raw = text.encode("utf-8")
    for i, b in enumerate(raw):
        if b >= vocab:
            hint = (" (this model was trained on a synthetic task: give token ids, e.g. --prompt \"3 17 0\")"
                    if token_ids else "")
            char = _char_at(text, i)
            raise EvalError(f"--prompt: byte {i} is 0x{b:02x}{f' (in {char!r})' if char else ''}, outside the model's "
                            f"vocabulary of {vocab} tokens (bytes 0x00 to 0x{vocab - 1:02x}){hint}")
    return list(raw)


def _char_at(text: str, offset: int) -> str:
    """The character of `text` whose UTF-8 encoding holds byte `offset`."""
    at = 0
    for ch in text:
        at += len(ch.encode("utf-8"))
        if offset < at:
            return ch
    return ""


def chooser(temperature: float, top_k: int, seed: int) -> Callable:
    """`choose(logits [B, V]) -> [B]`: the arg-max at temperature 0; else a draw from the softmax
    of logits / temperature, kept to the `top_k` largest (0: all), from a generator seeded once."""
    import torch
    g = torch.Generator().manual_seed(seed)

    def choose(logits):
        logits = logits.double().cpu()
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if 0 < top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]
    return choose


def stream(model, prompt, choose: Callable, tokens: int) -> Iterator:
    """The prefill (one forward pass over `prompt` [B, P]), then `tokens` tokens, each chosen from
    the last position's logits by `choose` and fed back alone with the state carried. Yields each
    call's logits [B, n, V] (the prompt's, then one position per token fed) and the token [B]
    chosen from them; the last token chosen is not fed."""
    import torch
    with torch.no_grad():
        logits, state = model(prompt)
        for i in range(tokens):
            token = choose(logits[:, -1]).to(prompt.device)
            yield logits, token
            if i + 1 < tokens:
                logits, state = model(token.view(-1, 1), state)


def stream_logits(model, ids, prefill: int):
    """The logits of `ids` [B, T] as sampling computes them: a prefill of the first `prefill`
    tokens, then the rest fed one at a time with the state carried (the tokens forced)."""
    import torch
    T = ids.shape[1]
    forced = iter(list(ids[:, prefill:].T) + [ids[:, -1]])   # the last is chosen, not fed

    return torch.cat([logits for logits, _ in stream(model, ids[:, :prefill], lambda _: next(forced),
                                                     T - prefill + 1)], 1)


def sample(run: Run, prompt: str, tokens: int = 100, temperature: float = 1.0, top_k: int = 0, seed: int = 0,
           emit: Callable[[str], None] = lambda s: print(s, end="", flush=True),
           note: Callable[[str], None] = lambda s: None) -> dict:
    """Generate `tokens` tokens after `prompt`, emitting each as it comes; returns the ids, the text
    (a text model) and the timings."""
    import torch
    if tokens < 1:
        raise EvalError(f"--tokens must be at least 1, got {tokens}")
    if not temperature >= 0 or temperature == float("inf"):
        raise EvalError(f"--temperature must be 0 (the arg-max) or a positive number, got {temperature}")
    if top_k < 0:
        raise EvalError(f"--top-k must be 0 (all tokens) or positive, got {top_k}")
    vocab, text = run.spec.model.vocab, run.text_model
    ids = prompt_ids(prompt, vocab, token_ids=not text)
    why = approximations(run.source)
    if why and tokens > 1:
        note(f"note: streaming `{run.spec.name}` is approximate beyond the prefill: {'; '.join(why)}. The prompt "
             f"(one forward pass) is exact; each later token is fed alone, which cuts every chunk")
    device = next(run.model.parameters()).device
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out, pieces, t0 = [], [], time.perf_counter()
    t_first = None
    for i, (_, token) in enumerate(stream(run.model, torch.tensor([ids], device=device),
                                          chooser(temperature, top_k, seed), tokens)):
        t_first = t_first or time.perf_counter()
        tok = int(token[0])
        out.append(tok)
        if text:
            piece = decoder.decode(bytes([tok])) if tok < 256 else "\ufffd"
        else:
            piece = ("" if i == 0 else " ") + str(tok)
        pieces.append(piece)
        if piece:
            emit(piece)
    tail = decoder.decode(b"", final=True) if text else ""
    pieces.append(tail)
    emit(tail + "\n")
    end = time.perf_counter()
    return {"prompt": ids, "ids": out, "text": "".join(pieces) if text else None, "prefill_tokens": len(ids),
            "prefill_s": t_first - t0, "tokens_per_s": (tokens - 1) / (end - t_first) if tokens > 1 else None,
            "exact": not why}
