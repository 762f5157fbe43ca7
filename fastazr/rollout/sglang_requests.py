"""fastazr Requests as SGLang inputs, and SGLang's outputs as the Completions the embedded engine
would give for them.

Each of a request's n samples is its own SGLang input (token ids, a sampling dict), with a seed
of its own derived from the request's: SGLang's `n` would give every sample the request's one
sampling_seed, and with deterministic inference on they would all be the same sequence.

SGLang gets no tokenizer (skip_tokenizer_init) and its ignore_eos turns off every token stop, the
request's stop_token_ids included; so stop strings, and stop ids under ignore_eos, are applied
here to the completion SGLang returns: it is cut at the first stop, as the engine stops there
(the tokens SGLang generated past it are discarded: their time is the cost).

Logprobs need no conversion: SGLang 0.5.23 divides the logits by the temperature, takes the
softmax, keeps log(probs) of the sampled token and only then filters top-k / top-p on a sorted
copy (sglang/srt/layers/sampler.py, Sampler.forward: `logits.div_(sampling_info.temperatures)`,
then `logprobs = torch.log(probs)` after `_sample_from_probs`, which does not write `probs`); a
greedy request is sampled as top_k = 1 at temperature 1, and an all-greedy batch takes
log_softmax(logits). That is Completion.logprobs: log softmax(logits / T), T = 1 for greedy,
before top-k / top-p. SGLANG_RETURN_ORIGINAL_LOGPROB=1 would make them pre-temperature: the
backend refuses to start with it set."""

from __future__ import annotations

from dataclasses import dataclass

from .request import Completion, Request, SamplingParams

MASK64 = 2**64 - 1


def sample_seed(base: int, sample: int) -> int:
    """Sample `sample`'s seed in [0, 2^63): splitmix64 of (base, sample), so requests seeded s and
    s + 1 share no sample's seed."""
    z = (base + (sample + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return (z ^ (z >> 31)) >> 1


def sampling_params(params: SamplingParams, stop_ids: list[int], max_new_tokens: int, seed: int) -> dict:
    """SGLang's sampling dict (sglang/srt/sampling/sampling_params.py; the contract test checks
    each key). Temperature 0 is SGLang's greedy too (top_k 1 at temperature 1); top_k 0 (off)
    is SGLang's -1."""
    return dict(temperature=params.temperature, top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else -1, max_new_tokens=max_new_tokens,
                stop_token_ids=stop_ids, ignore_eos=params.ignore_eos, sampling_seed=seed)


@dataclass
class Batch:
    """One generate() call's SGLang inputs, one per sample, and where each result goes back."""
    input_ids: list[list[int]]
    sampling: list[dict]
    slots: list[tuple[int, int]]
    """(request index, sample index) of each input."""
    too_long: list[int]
    """Requests whose prompt fills the context: every sample finishes 'prompt_too_long' unsent."""


def build_batch(requests: list[Request], context_length: int, eos_ids: set[int], draw_seed) -> Batch:
    """draw_seed() gives the base seed of a request without one (the backend's seed stream, drawn
    in request order as the embedded engine does)."""
    batch = Batch([], [], [], [])
    for i, request in enumerate(requests):
        p = request.params
        base = p.seed if p.seed is not None else draw_seed()
        room = context_length - len(request.prompt_ids)
        if room <= 0:
            batch.too_long.append(i)
            continue
        # under ignore_eos SGLang honours no stop id at all: they are cut here (finish_completion)
        stop_ids = [] if p.ignore_eos else sorted(set(p.stop_token_ids) | eos_ids)
        for j in range(request.n):
            batch.input_ids.append(list(request.prompt_ids))
            batch.sampling.append(sampling_params(p, stop_ids, min(p.max_new_tokens, room), sample_seed(base, j)))
            batch.slots.append((i, j))
    return batch


def finish_completion(request: Request, output: dict, eos_ids: set[int], tokenizer) -> Completion:
    """The Completion of one SGLang output {"output_ids", "meta_info"} (what Engine.generate
    returns per input with skip_tokenizer_init and return_logprob)."""
    meta = output["meta_info"]
    ids = list(output["output_ids"])
    entries = meta["output_token_logprobs"]
    if len(entries) != len(ids) or any(e[1] != t for e, t in zip(entries, ids)):
        raise RuntimeError(f"SGLang returned {len(ids)} token ids and {len(entries)} logprobs that do not match "
                           "them: a change in SGLang's output format (fastazr is tested against "
                           "sglang==0.5.23)")
    logprobs = [float(e[0]) for e in entries]
    reason = _reason(meta["finish_reason"], ids, eos_ids, request.params)
    end, reason = _first_stop(ids, reason, request.params, tokenizer)
    return Completion(list(request.prompt_ids), ids[:end], logprobs[:end], reason)


def _reason(finish: dict | None, ids: list[int], eos_ids: set[int], params: SamplingParams) -> str:
    """fastazr's finish reason for SGLang's: {"type": "length"} or {"type": "stop", "matched":
    token id}; anything else (an abort, a NaN guard's matched string) is an error."""
    if finish is not None and finish["type"] == "length":
        return "length"
    if finish is not None and finish["type"] == "stop" and isinstance(finish["matched"], int):
        token = finish["matched"]
        if not ids or ids[-1] != token:
            raise RuntimeError(f"SGLang stopped on token {token}, which does not end its completion")
        return "eos" if token in eos_ids and not params.ignore_eos else "stop_token"
    raise RuntimeError(f"SGLang ended a request with {finish!r}: an abort (a sequence its KV pool cannot hold: "
                       "raise --sglang.mem-fraction-static or shorten the prompts) or non-finite logits")


def _first_stop(ids: list[int], reason: str, params: SamplingParams, tokenizer) -> tuple[int, str]:
    """(tokens kept, reason) once the stops SGLang did not see are applied: the engine checks each
    new token for a stop id, then the text for a stop string, so the earliest wins and a token
    stop wins a tie."""
    end = len(ids)
    if params.ignore_eos and params.stop_token_ids:
        hit = next((k for k, t in enumerate(ids) if t in params.stop_token_ids), None)
        if hit is not None:
            end, reason = hit + 1, "stop_token"
    if params.stop_strings:
        text_end = _stop_string_end(ids[:end], params.stop_strings, tokenizer)
        if text_end is not None and (text_end < end or reason == "length"):
            end, reason = text_end, "stop_string"
    return end, reason


def _stop_string_end(ids: list[int], stops: tuple[str, ...], tokenizer) -> int | None:
    """The fewest leading tokens whose text holds a stop string, or None: a binary search, since a
    longer prefix's text holds whatever a shorter one's does (~log2(n) decodes, not n)."""
    if not any(s in tokenizer.decode(ids) for s in stops):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in tokenizer.decode(ids[:mid]) for s in stops):
            hi = mid
        else:
            lo = mid + 1
    return lo
