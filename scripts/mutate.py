"""Plant known bugs, one at a time, and check that the tests see each of them.

A mutation is a regex edit of one file of a copy of mistral/ in a temporary folder;
the tests it names then run with that folder as their working directory and first on
PYTHONPATH, so `import mistral` finds the mutant, in pytest and in the subprocesses
that some tests start (the CLI, torchrun, spawned ranks). This tree is never modified.

A mutation is caught when one of its tests fails on an assertion: an AssertionError,
or pytest's own failure (pytest.raises that did not raise). A test that fails with
any other exception crashed: the bug broke the code rather than being seen by a
check, and does not count. The first assertion stops the run.

    python scripts/mutate.py                        # all mutations
    python scripts/mutate.py --list                 # names, files, tests; checks every pattern applies
    python scripts/mutate.py temperature-ignored eos-stops-whole-batch
    python scripts/mutate.py --baseline             # the same test runs unmutated: all must pass
    python scripts/mutate.py --env MISTRAL_TEST_DEVICE=cuda   # (the environment is passed on anyway)

This module is also the pytest plugin (`-p mutate`) that records how each test failed.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE, TESTS = ROOT / "mistral", ROOT / "tests"
REPORT = "MUTATE_REPORT"  # environment variable: the JSON-lines file the plugin appends to


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to mistral/
    pattern: str  # a regex that must match exactly once
    replacement: str
    tests: str  # pytest arguments; test_*.py paths are relative to tests/
    bug: str
    cuda: bool = False  # a bug in a CUDA kernel: only the tests on a GPU can see it

    def mutated(self, source: str) -> str:
        """source (of mistral/{file}) with the bug planted; ValueError unless the pattern matches exactly once."""
        text, n = re.subn(self.pattern, self.replacement, source)
        if n != 1:
            raise ValueError(f"{self.name}: pattern {self.pattern!r} matched {n} times in mistral/{self.file}, not once")
        return text

    def apply(self, package: Path) -> None:
        path = package / self.file
        path.write_text(self.mutated(path.read_text()))

    def pytest_args(self) -> list[str]:
        return [str(TESTS / a) if a.startswith("test_") else a for a in shlex.split(self.tests)]


MUTATIONS = [
    # --- masks -------------------------------------------------------------------------
    Mutation("window-one-wider", "masks.py", r"make_local_attention\(sliding_window\)", "make_local_attention(sliding_window + 1)",
             "test_attention.py test_model.py::test_logits_match_hf", "prefill: query i sees keys i-W .. i"),
    Mutation("chunk-window-one-wider", "masks.py", r"make_local_attention_from_bottomright\(sliding_window\)",
             "make_local_attention_from_bottomright(sliding_window + 1)",
             "test_attention.py test_cache.py::test_chunked_prefill_equals_full_prefill", "a later chunk sees one cached key too many"),
    Mutation("chunk-causal-from-top-left", "masks.py", r"make_causal_from_bottomright\(\)", "make_causal()",
             "test_cache.py::test_full_attention_with_cache", "a chunk's queries aligned with the cached keys, not the new ones"),
    Mutation("no-window-in-prefill", "masks.py", r"return mask if sliding_window is None else mask\.make_local_attention\(sliding_window\)",
             "return mask", "test_model.py::test_logits_match_hf", "the first prefill ignores the sliding window"),
    # --- cache -------------------------------------------------------------------------
    Mutation("slot-shifted", "cache.py", r"rows \* size \+ positions % size", "rows * size + (positions + 1) % size",
             "test_cache.py::test_rolling_buffer_wraps_past_window", "position p stored in slot (p + 1) mod W"),
    Mutation("decode-keys-one-short", "cache.py", r"\(positions \+ 1\)\.clamp\(max=size\)", "positions.clamp(max=size)",
             "test_cache.py::test_rows_with_different_cached_lengths_share_a_call", "a decode query misses its newest key"),
    # A chunk's first query sees only the last W - 1 cached tokens, and the oldest of the W
    # a row holds is overwritten by the next write before a query could read it: so
    # reading or storing one token fewer is harmless, and these take two.
    Mutation("chunk-reads-too-few-cached-keys", "cache.py", r"n = c\.clamp\(max=size\)", "n = c.clamp(max=size - 2)",
             "test_cache.py::test_chunked_prefill_equals_full_prefill", "a chunk reads W - 2 cached tokens: its first query misses one"),
    Mutation("write-from-one-early", "cache.py", r"write_from=_ranges\(start \+ s - keep, keep\)", "write_from=_ranges((start + s - keep - 1).clamp(min=0), keep)",
             "test_cache.py", "a call stores each row's new keys one token early (a row's first, twice)"),
    Mutation("chunk-keys-overlap", "cache.py", r"key = \(n \+ s\)\.cumsum\(0\) - \(n \+ s\)", "key = n.cumsum(0) - n",
             "test_cache.py", "a chunk call lays each row's keys out as if the rows before had no new tokens"),
    Mutation("mixed-decodes-rows-from-0", "cache.py", r"Decode\(\[cached\[b\] for b in decoding\], size, device, rows=decoding\)",
             "Decode([cached[b] for b in decoding], size, device)", "test_cache.py::test_rows_with_different_cached_lengths_share_a_call",
             "a chunk call's decoding rows read and write rows 0, 1, ... instead of their own"),
    Mutation("cache-stores-too-few", "cache.py", r"keep = s\.clamp\(max=size\)", "keep = s.clamp(max=size - 2)",
             "test_cache.py::test_chunked_prefill_equals_full_prefill", "a long chunk stores only W - 2 of its last tokens"),
    # --- model, attention --------------------------------------------------------------
    Mutation("rope-theta-fixed", "model.py", r"self\.args\.head_dim, self\.args\.rope_theta\)", "self.args.head_dim, 10000.0)",
             "test_model.py -k 'mistral and (hf or rope)'", "the rotary call ignores params.json's theta (Mistral tests only)"),
    Mutation("rope-theta-fixed-1e6", "model.py", r"self\.args\.head_dim, self\.args\.rope_theta\)", "self.args.head_dim, 1e6)",
             "test_model.py -k 'mistral and (hf or rope)'", "the same, fixed at Mixtral's theta"),
    Mutation("hf-convert-drops-rope-theta", "hf.py", r"rope_theta=float\(rope_theta\)", "rope_theta=10000.0",
             "test_model.py -k 'mistral and (hf or rope)'", "the converter writes the default theta"),
    Mutation("rotary-halves-not-pairs", "model.py", r"x\.float\(\)\.unflatten\(-1, \(-1, 2\)\)\.unbind\(-1\)", "x.float().chunk(2, dim=-1)",
             "test_model.py::test_rotary_matches_closed_form", "rotary rotates (x[j], x[j + Dh/2]) instead of interleaved pairs"),
    Mutation("gqa-heads-tiled", "attention.py", r"keys = keys\.repeat_interleave\(H // H_kv, dim=1\)", "keys = keys.repeat(1, H // H_kv, 1)",
             "test_attention.py", "query head h reads key head h mod H_kv, not h // (H / H_kv)"),
    # --- MoE ---------------------------------------------------------------------------
    Mutation("moe-softmax-before-topk", "moe.py", r"torch\.topk\(gate_logits,", "torch.topk(torch.softmax(gate_logits, dim=-1),",
             "test_model.py -k 'logits_match_hf and mixtral'", "gate weights: softmax over all experts, then again over the top k"),
    Mutation("moe-grouped-weights-unsorted", "moe.py", r"weights\.flatten\(\)\[order, None\]", "weights.flatten()[:, None]",
             "test_model.py::test_moe_forward_equals_reference_loop", "grouped path: gate weights not sorted with their pairs"),
    Mutation("moe-matvec-pairs-tiled", "moe.py", r"x\.repeat_interleave\(A, dim=0\)", "x.repeat(A, 1)",
             "test_model.py::test_moe_forward_equals_reference_loop", "fast decode path: pair p gets token p mod T"),
    # --- sampling, generation ----------------------------------------------------------
    Mutation("temperature-ignored", "sampling.py", r"\) / temperature, dim=-1\)", "), dim=-1)",
             "test_generate.py -k sample", "sampling at temperature 1 whatever was asked"),
    Mutation("top-p-drops-crossing-token", "sampling.py", r"ordered\.cumsum\(dim=-1\) - ordered > \(top_p", "ordered.cumsum(dim=-1) > (top_p",
             "test_generate.py -k sample", "the token that reaches top_p is cut (and a top token above top_p)"),
    Mutation("top-p-keeps-least-likely", "sampling.py", r"descending=True", "descending=False",
             "test_generate.py -k sample", "the nucleus is taken from the unlikely end"),
    Mutation("rows-share-the-first-generator", "sampling.py", r"row\.exponential_\(generator=g\)", "row.exponential_(generator=generator[0])",
             "test_generate.py -k own_options", "rows sampled together draw from the first row's generator"),
    Mutation("rows-take-the-first-top-p", "sampling.py", r"\(top_p\[\.\.\., None\] if", "(top_p[:1][..., None] if",
             "test_generate.py -k own_options", "rows sampled together keep the first row's nucleus"),
    Mutation("race-draw-of-zero", "sampling.py", r"race\.clamp_\(min=torch\.finfo\(torch\.float32\)\.tiny\)", "race.mul_(0)",
             "test_generate.py -k 'own_options or hand_written'", "every race draw is 0: tokens of no mass win as NaN"),
    Mutation("logprob-normalised-over-batch", "sampling.py", r"torch\.log_softmax\(logits, dim=-1\)\.gather",
             "torch.log_softmax(logits, dim=0).gather",
             "test_generate.py::test_logprobs_are_log_softmax_of_full_forward", "log-probabilities normalised over the batch"),
    Mutation("stream-ends-with-the-shortest", "generation.py", r"default=max\(map\(_steps_of, requests\)\)",
             "default=min(map(_steps_of, requests))",
             "test_generate.py::test_eos_stops_a_sequence", "once every sequence has ended, the stream stops at the one that ended first"),
    Mutation("eos-step-not-yielded", "generation.py", r'\+ \(r\.finish_reason == "stop"\)', "+ 0",
             "test_generate.py::test_eos_stops_a_sequence", "a stream ends without the step in which the last sequence produced eos"),
    Mutation("step-tokens-in-the-wrong-rows", "generation.py", r"else eos_id for r in requests\]", "else eos_id for r in requests[::-1]]",
             "test_generate.py::test_batch_equals_each_prompt_alone", "a step's tokens come out in the wrong rows"),
    Mutation("seeds-shared-by-prompts", "generation.py", r"seed=None if seed is None else \(seed \+ i\) % 2\*\*64", "seed=seed",
             "test_generate.py -k own_seed", "every prompt of a batch draws the same numbers"),
    Mutation("later-batches-reuse-the-seed", "generation.py", r"\(seed \+ first\) % 2\*\*64", "seed",
             "test_generate.py -k own_seed", "generate's later batches draw as its first did"),
    Mutation("chunk-size-per-call-not-per-prompt", "generation.py", r"chunk_size=\(chunk_size or c\.size\) \* n,", "chunk_size=(chunk_size or c.size),",
             "test_generate.py -k chunk_size_tokens_of_every", "a stream's prompts share one prompt's chunk: they start one after the other"),
    Mutation("ended-row-handed-back-as-it-is", "generation.py", r"if b in engine\.overwritten:", "if False:",
             "test_generate.py -k given_cache_keeps", "a given cache's row where placeholders were decoded is handed back as the sequence's"),
    Mutation("prompt-chunk-not-per-row", "engine.py", r"min\(budget, self\.row_chunk\)", "budget",
             "test_generate.py -k chunk_size_tokens_of_every", "a prompt reads the whole call's budget, past chunk_size"),
    Mutation("resumed-row-reads-its-prompt-again", "engine.py", r"request\.row, request\.read = request, row, held", "request.row, request.read = request, row, 0",
             "test_generate.py -k given_cache_keeps", "a continued row reads the tokens its cache holds a second time"),
    Mutation("eos-kept-in-output", "generation.py", r"stop = toks\.index\(eos_id\) if", "stop = toks.index(eos_id) + 1 if",
             "test_generate.py::test_eos_stops_a_sequence", "generate() returns the eos token"),
    # --- parallel ----------------------------------------------------------------------
    Mutation("layer-split-shifted", "parallel.py", r"start = index \* base \+ min\(index, extra\)",
             "start = index * base + min(index + 1, extra)",
             "test_parallel.py::test_layers_split_as_evenly_as_possible", "pipeline stages' layers shifted by one"),
    Mutation("tensor-parallel-no-ffn-all-reduce", "parallel.py", r"for module in \(block\.attention, block\.feed_forward\):",
             "for module in (block.attention,):",
             "test_parallel.py -k 'P1xT2 and logits_equal'", "tensor ranks never sum their feed-forward halves"),
    Mutation("pipeline-logprobs-are-token-ids", "parallel.py", r"return message\[0\]\.long\(\), message\[1\]\.float\(\)",
             "return message[0].long(), message[0].float()",
             "test_parallel.py -k 'P2xT1 and greedy_tokens_equal'", "ranks other than the sampler receive wrong log-probabilities"),
    # --- tokenizer, CLI ----------------------------------------------------------------
    Mutation("tokenizer-always-bos", "tokenizer.py", r"\[self\.bos_id\] \* bos", "[self.bos_id]",
             "test_tokenizer.py", "encode(bos=False) still starts with <s>"),
    Mutation("stream-splits-characters", "text.py", r'if not final and text\.endswith\("\\ufffd"\):', "if False:",
             "test_cli_stream.py::test_streamed_text_never_splits_a_character", "a half-received UTF-8 character is printed as U+FFFD"),
    Mutation("completion-decoded-alone", "text.py",
             r"self\.tokenizer\.decode\(self\.prompt_tokens \+ self\.tokens\)\[len\(self\.prompt_text\) :\]",
             "self.tokenizer.decode(self.tokens)",
             "test_tokenizer.py -k streamed_pieces",
             "the completion decoded alone loses the space sentencepiece folds into its first word"),
    Mutation("cli-output-without-prompts", "main.py", r'write\(f"\{prompts\[printed\]\}\{', 'write(f"{',
             "test_cli.py::test_more_prompts_than_max_batch_size_run_in_batches", "several prompts: completions printed without their prompts"),
    Mutation("chat-forgets-closing-eos", "main.py", r"tokens\[tokens\.index\(self\.tokenizer\.eos_id, len\(self\.prompt\)\) :\]",
             # (test_cli's tiny model has a window of 8: the missing eos is out of reach of the next answer)
             "tokens[tokens.index(self.tokenizer.eos_id, len(self.prompt)) + 1 :]", "test_cli_stream.py::test_chat_keeps_conversation_in_cache",
             "a chat's history lacks the eos that closes each answer"),
    # --- the fast path -----------------------------------------------------------------
    Mutation("runner-prefill-does-not-advance", "decode.py", r"\n        self\.cache\.advance\(seqlens\)\n        return out\n", "\n        return out\n",
             "test_decode.py::test_runner_equals_model_forward", "the Runner's prefill leaves the cache lengths behind"),
    Mutation("graph-step-key-lengths-stale", "cache.py",
             r"self\.mask\.k_seqinfo\.seqlen\.copy_\(key_lengths\(self\.positions, self\.size\)\)",
             "self.mask.k_seqinfo.seqlen.copy_(key_lengths(self.positions - 1, self.size))",
             "test_decode.py::test_decode_inputs_advance_like_a_new_call", "a captured decode step reads one key too few"),
    Mutation("step-past-eos-stays-in-cache", "generation.py", r"cache\.rewind\(b, promised\)", "pass",
             "test_generate.py -k 'eos or left_early'", "a step run past the last yielded one leaves its token in a given cache"),
    Mutation("rewind-forgets-overwritten-slots", "cache.py", r"written <= self\.size or length >= written - \(self\.size - reach\) - 1", "True",
             "test_cache.py -k rewind", "a rewind keeps slots that a later token (since rewound) overwrote"),
    Mutation("spare-cache-not-reset", "stage.py", r"\n                c\.reset\(\)\n", "\n                pass\n",
             "test_speculate.py -k later_speculative", "a later speculative call starts from the last one's cache lengths"),
    Mutation("replayed-graph-not-restarted", "decode.py", r"self\.inputs\.restart\(lengths\)", "pass",
             "test_generate.py -k reuses", "a reused decode graph goes on from the last stream's positions", cuda=True),
    # --- int8 weights ---------------------------------------------------------------------
    Mutation("int8-scales-ignored", "kernels.py", r"return y if scales is None else y \* scales\n", "return y\n",
             "test_quantize.py -k logits", "int8 weights used without their scales"),
    # --- int4 weights ------------------------------------------------------------------------
    Mutation("int4-reads-nibbles-swapped", "kernels.py", r"torch\.stack\(\(w & 15, w >> 4\), dim=-1\)", "torch.stack((w >> 4, w & 15), dim=-1)",
             "test_quantize.py -k codes_stand_for", "the CPU reads column 2j from a byte's high nibble"),
    Mutation("int4-packs-nibbles-swapped", "linear.py", r"q\[\.\.\., 0::2\] \| \(q\[\.\.\., 1::2\] << 4\)", "q[..., 1::2] | (q[..., 0::2] << 4)",
             "test_quantize.py -k half_a_step", "quantize writes column 2j into a byte's high nibble"),
    Mutation("int4-codes-off-by-one", "linear.py", r"q = torch\.round\(\(groups - mins\[\.\.\., None\]\) / scales\[\.\.\., None\]\)",
             "q = (torch.round((groups - mins[..., None]) / scales[..., None]) - 1)",
             "test_quantize.py -k half_a_step", "codes one level below their weight: the zero point off by one"),
    Mutation("int4-fifteen-levels", "linear.py", r"\(maxs - mins\) / 15\)", "(maxs - mins) / 14)",
             "test_quantize.py -k half_a_step", "a group's range spread over 15 levels, the top code unused"),
    Mutation("int4-scales-of-the-next-group", "kernels.py", r"groups \* scales\[\.\.\., None\]\.float\(\)",
             "groups * scales.roll(-1, dims=-1)[..., None].float()",
             "test_quantize.py -k codes_stand_for", "the CPU applies each group the next group's scale"),
    Mutation("int4-rank-reads-rank-0-scales", "checkpoint.py",
             r"slice\(tensor_rank \* view\.shape\[1\], \(tensor_rank \+ 1\) \* view\.shape\[1\]\)",
             'slice((r := 0 if name.endswith(".scales") else tensor_rank) * view.shape[1], (r + 1) * view.shape[1])',
             "test_parallel.py -k 'P1xT2 and int4'", "every tensor rank reads rank 0's groups of wo's and w2's int4 scales"),
    Mutation("int4-groups-straddle-ranks", "parallel.py", r"if group is not None and width // T % group:", "if False:",
             "test_parallel.py -k bad_layouts", "a tensor-parallel layout that splits an int4 group is let through"),
    Mutation("quantized-dtypes-unchecked", "checkpoint.py", r"and found != view\.dtype:", "and False:",
             "test_quantize.py -k bad_quantization", "int4 or int8 codes load into a float weight"),
    Mutation("quantize-holds-the-whole-output", "quantize.py", r"TensorStream\(_written\(specs, quantization\), tensors\(\)\)",
             "TensorStream(_written(specs, quantization), list(tensors()))",
             "test_quantize.py -k one_tensor_at_a_time", "quantize holds every quantized tensor before it writes"),
    # The int4 matrix-vector kernel's: caught on a GPU, or on the CPU in Triton's interpreter
    # (--env TRITON_INTERPRET=1, with Triton on PYTHONPATH).
    Mutation("int4-kernel-nibbles-swapped", "kernels.py", r"tl\.join\(packed & 15, packed >> 4\)", "tl.join(packed >> 4, packed & 15)",
             "test_decode.py -k matvec_kernel", "the kernel reads column 2j from a byte's high nibble", cuda=True),
    Mutation("int4-kernel-group-off-by-one", "kernels.py", r"groups = k0 // GROUP \+ tl\.arange", "groups = k0 // GROUP + 1 + tl.arange",
             "test_decode.py -k matvec_kernel", "the kernel applies each group the next group's scale and minimum", cuda=True),
    Mutation("int4-kernel-minimum-left-out", "kernels.py", r"\* s \+ m, \(BLOCK_N, BLOCK_K\)\)", "* s, (BLOCK_N, BLOCK_K))",
             "test_decode.py -k matvec_kernel", "the kernel leaves out each group's minimum", cuda=True),
    Mutation("small-int4-scaled-twice", "kernels.py", r"dict\(HAS_SCALES=scales is not None and mins is None, GROUP=group, EXPERTS", "dict(HAS_SCALES=scales is not None, GROUP=group, EXPERTS",
             "test_decode.py -k small_batch_kernel", "the small-batch kernel scales int4's products again by a row's first group scale", cuda=True),
    Mutation("small-int4-row-stride", "kernels.py", r"_int4_tile\(w_ptr \+ n64 \* \(K // 2\)", "_int4_tile(w_ptr + n64 * K",
             "test_decode.py -k small_batch_kernel", "the small-batch kernel steps a whole byte per int4 column between rows", cuda=True),
    Mutation("dequantize-tiles-overlap", "kernels.py", r"\n        cols = k0 \+ tl\.arange\(0, BLOCK_K\)\n", "\n        cols = tl.arange(0, BLOCK_K)\n",
             "test_decode.py -k dequantize_kernel", "the dequantize kernel writes every column tile at the first", cuda=True),
    Mutation("dequantize-group-stride", "kernels.py", r"s_ptr \+ r64 \* \(K // GROUP\), m_ptr \+ r64 \* \(K // GROUP\)",
             "s_ptr + r64 * (K // GROUP), m_ptr + r64 * (K // GROUP // 2)",
             "test_decode.py -k dequantize_kernel", "the dequantize kernel reads the minimums of the wrong rows", cuda=True),
    Mutation("grouped-experts-start-at-row-0", "kernels.py", r"start = tl\.where\(e > 0, tl\.load\(ends_ptr \+ tl\.maximum\(e - 1, 0\)\), 0\)",
             "start = 0", "test_decode.py -k grouped_experts", "the grouped experts' kernel runs every expert on the rows from 0", cuda=True),
    Mutation("grouped-experts-one-block", "kernels.py", r"for m0 in range\(start, end, BLOCK_M\):", "for m0 in range(start, start + 1, BLOCK_M):",
             "test_decode.py -k grouped_experts", "the grouped experts' kernel takes the first block of an expert's rows only", cuda=True),
    Mutation("grouped-experts-scales-of-expert-0", "kernels.py", r"            w_ptr \+= e\.to\(tl\.int64\) \* N \* K\n            s_ptr \+= e\.to\(tl\.int64\) \* N\n",
             "            w_ptr += e.to(tl.int64) * N * K\n", "test_decode.py -k grouped_experts", "the grouped experts' kernel scales every expert's int8 rows by expert 0's scales", cuda=True),
    Mutation("grouped-experts-cpu-loop-scales-of-expert-0", "kernels.py", r"linear\(x\[start:end\], w\[e\], scales\[e\]", "linear(x[start:end], w[e], scales[0]",
             "test_decode.py -k grouped_experts", "expert_linear's CPU loop scales every expert by expert 0's scales"),
    Mutation("matvec-reads-other-ranks-expert", "kernels.py", r"held = row_ok & \(out_rows \* 0 \+ e >= 0\)", "held = row_ok",
             "test_decode.py -k matvec_kernel", "the kernel reads expert -1's weights (another rank's) instead of writing zeros", cuda=True),
    # --- the decode kernel ----------------------------------------------------------------
    Mutation("decode-reads-one-past-window", "kernels.py", r"\| \(_behind\(slots, S\) >= visible\[:, None\]\)",
             "| (_behind(slots, S) > visible[:, None])", "test_attention.py -k 'decode_kernel or verify_step_on'",
             "the decode kernel's reference attends to one position more than the window (or before a fresh row's first)"),
    Mutation("decode-kernel-row-of-query", "kernels.py", r"row = slot // S \* S  # the row's first slot", "row = (b * S).to(tl.int64)",
             "test_attention.py -k decode_kernel", "the Triton decode kernel reads row b for query b, not the row of its slot", cuda=True),
    Mutation("decode-kernel-never-stores", "kernels.py", r"if split == 0:", "if split < 0:",
             "test_attention.py -k decode_kernel", "the Triton decode kernel leaves the new key and value out of the cache",
             cuda=True),
    Mutation("decode-kernel-merges-first-run", "kernels.py", r"runs = tl\.maximum\(tl\.cdiv\(length, chunk\), 1\)", "runs = 1",
             "test_attention.py -k decode_kernel", "the Triton decode kernel merges the first run of keys only", cuda=True),
    Mutation("decode-kernel-waits-for-idle-programs", "kernels.py", r'sem="acq_rel"\) == runs - 1:', 'sem="acq_rel") == SPLITS - 1:',
             "test_attention.py -k splits_rows", "the Triton decode kernel merges once SPLITS programs arrive, though those past a short row's runs return early", cuda=True),
    Mutation("decode-kernel-idle-program-arrives", "kernels.py", r"if split >= runs:", "if split > runs:",
             "test_attention.py -k splits_rows", "a Triton decode program past a row's runs counts an arrival (the count ends off by one)", cuda=True),
    Mutation("decode-kernel-runs-too-short", "kernels.py", r"tl\.cdiv\(tl\.cdiv\(length, SPLITS\), BLOCK_S\)",
             "tl.cdiv(tl.cdiv(length, 2 * SPLITS), BLOCK_S)",
             "test_attention.py -k splits_rows", "the Triton decode kernel's runs leave a row's last keys unread", cuda=True),
    Mutation("decode-kernel-verify-sees-ahead", "kernels.py", r"read = \(s < end\) & \(behind > 0\) & \(behind < visible\)",
             "read = (s < end) & (behind > 0)", "test_attention.py -k verifies_in_any",
             "the Triton decode kernel's verify queries read later proposals and past their window", cuda=True),
    Mutation("decode-reference-verify-sees-ahead", "kernels.py", r" \| \(_behind\(slots, S\) >= visible\[:, None\]\)", "",
             "test_attention.py -k verify_step_on", "the decode kernel's PyTorch version reads later proposals and past the window"),
    Mutation("verify-window-unclamped", "cache.py", r"\(self\.positions \+ 1\)\.clamp\(max=self\.window\)", "self.positions + 1",
             "test_attention.py -k verify_step_on", "a verify step's queries read past their window, in rows of W + k slots"),
    Mutation("verify-keys-not-stored-first", "cache.py", r"        _store\(k, v, xk, xv, self\.queries\.write_to\)\n", "",
             "test_attention.py -k verify_step_on", "a verify step's later queries read stale slots for the earlier new tokens",
             cuda=True),
    # --- chunk calls read in place (a server's, replayed from graphs) ---------------------------
    Mutation("chunk-reads-one-past-window", "kernels.py", r"cache_v, slots, _behind\(slots, S\) >= visible",
             "cache_v, slots, _behind(slots, S) > visible", "test_attention.py -k in_place",
             "a chunk call read in place attends to one position more than the window (or before a fresh row's first)"),
    Mutation("chunk-window-ignored", "kernels.py", r"\(positions\[real\] \+ 1\)\.clamp\(max=window\)", "positions[real] + 1",
             "test_attention.py -k in_place", "a chunk call read in place attends past the window, to what its row's slots still hold"),
    Mutation("in-place-one-overwrite-too-many", "cache.py", r"c \+ L - 1 - size < max", "c + L - 2 - size < max",
             "test_cache.py -k in_place", "a call is read in place though its row's last new key overwrites one that its first query reads"),
    Mutation("chunk-kernel-not-causal", "kernels.py", r"sees = \(kp\[None, :\] <= qp\[:, None\]\)", "sees = (kp[None, :] < end)",
             "test_attention.py -k triton_chunk", "the Triton chunk kernel lets a tile's queries see its later queries' keys", cuda=True),
    Mutation("chunk-kernel-one-past-window", "kernels.py", r"\(kp\[None, :\] > qp\[:, None\] - WINDOW\)", "(kp[None, :] >= qp[:, None] - WINDOW)",
             "test_attention.py -k triton_chunk", "the Triton chunk kernel attends to one position more than the window", cuda=True),
    Mutation("chunk-kernel-contiguous-queries", "kernels.py", r"\[:, None\] \* q_stride \+ head_at", "[:, None] * (H_KV * G * D) + head_at",
             "test_attention.py -k triton_chunk", "the Triton chunk kernel reads the queries as if their rows were contiguous (the model's are views of wq|wk|wv's output)", cuda=True),
    Mutation("store-keys-contiguous-rows", "kernels.py", r"tl\.load\(kn_ptr \+ t \* kn_stride \+ c", "tl.load(kn_ptr + t * HD + c",
             "test_attention.py -k triton_chunk", "the Triton store kernel reads the new keys as if their rows were contiguous", cuda=True),
    Mutation("chunk-tiles-overlap", "cache.py", r"\.repeat_interleave\(per_row\) \+ j \* self\.tile", ".repeat_interleave(per_row) + j",
             "test_cache.py -k worked_example", "a row's tiles start a query apart, not a tile: the kernel leaves queries out"),
    Mutation("chunk-call-inputs-stale", "decode.py", r"        call\.inputs\.restart\(seqlens, self\.cache\.lengths\)\n", "",
             "test_engine.py -k come_and_go", "a bucket's chunk call runs the inputs it was made with (padding alone)"),
    Mutation("chunk-call-logits-of-first-token", "decode.py", r"to_device\(list\(rows\), call\.rows\.device", "to_device([0] * len(rows), call.rows.device",
             "test_engine.py -k come_and_go", "a bucket's chunk call hands back the first token's logits for every sampling row"),
    Mutation("verify-logits-of-wrong-tokens", "speculate.py", r"\[b \* n \+ i for b, count", "[b + i for b, count",
             "test_speculate.py -k greedy_speculation", "speculation checks the proposals against other positions' logits"),
    Mutation("draft-logits-of-wrong-token", "speculate.py", r"\[b \* n \+ len\(unseen\[b\]\) - 1 for b", "[b * n for b",
             "test_speculate.py -k 'itself_has_every or own_greedy_continuation'", "the draft drafts from its first new token's logits, not its last's"),
    Mutation("draft-filler-kept", "speculate.py", r"self\.cache\.rewind\(b, before\[b\] \+ len\(unseen\.get\(b, \(\)\)\)\)",
             "self.cache.rewind(b, before[b] + n)", "test_speculate.py -k own_greedy_continuation",
             "the draft's cache keeps the filler of its verify steps"),
    Mutation("verify-idle-rows-not-taken-back", "speculate.py", r"                cache\.rewind\(b, before\[b\]\)\n", "                pass\n",
             "test_speculate.py -k no_filler", "a row that no longer runs keeps the verify step's filler tokens: its cache fills up"),
    # --- fusions of the matrix-vector kernel, and the batched causal prefill ------------------
    Mutation("matvec-norm-without-gain", "kernels.py", r"xk \*= tl\.load\(g_ptr", "xk += 0 * tl.load(g_ptr",
             "test_decode.py -k takes_in", "the fused RMSNorm leaves out its weight", cuda=True),
    Mutation("matvec-swiglu-gates-w3", "kernels.py", r"y = y1 \* tl\.sigmoid\(y1\) \* y3", "y = y3 * tl.sigmoid(y3) * y1",
             "test_decode.py -k takes_in", "the fused SwiGLU gates the w3 half instead of w1", cuda=True),
    Mutation("fused-norm-skips-hooks", "linear.py", r" and _unhooked\(norm\)", "",
             "test_decode.py -k hook_on_a_norm", "the int8 kernel takes in a norm that has a hook, skipping it",
             cuda=True),
    Mutation("swiglu-gates-w3", "kernels.py", r"return nn\.functional\.silu\(h1\) \* h3", "return nn.functional.silu(h3) * h1",
             "test_model.py -k match_hf", "SwiGLU gates the w3 half instead of w1"),
    Mutation("causal-blocks-window-short", "attention.py", r"window >= max\(blocks\)", "window >= max(blocks) - 1",
             "test_attention.py -k causal_blocks", "a window one short of the prompts taken for plain causal attention"),
    Mutation("causal-blocks-sequences-swapped", "attention.py", r"torch\.cat\(\[t\[s : s \+ L\] for s in starts\]\)",
             "torch.cat([t[s : s + L] for s in reversed(starts)])", "test_attention.py -k causal_blocks",
             "packed prompts of one length, not back to back, each given another's attention"),
    Mutation("int8-step-too-small", "linear.py", r"\) / 127", ") / 128", "test_quantize.py -k half_a_step",
             "the largest weight of a row no longer fits the int8 range"),
    Mutation("decode-reads-every-slot", "cache.py", r"padding = size if static else max\(reads\)", "padding = size",
             "test_cache.py -k filled_slots", "an eager decode step reads the whole row, filled or not"),
    # --- loading and the cold start ----------------------------------------------------
    Mutation("load-rank-reads-rank-0-rows", "checkpoint.py", r"first_row = tensor_rank \* rows if dim == 0 else 0",
             "first_row = 0", "test_parallel.py -k logits_equal_single_process", "every tensor-parallel rank reads rank 0's rows"),
    Mutation("load-columns-of-rank-0", "checkpoint.py", r"slice\(tensor_rank \* view\.shape\[1\], \(tensor_rank \+ 1\)",
             "slice(0 * view.shape[1], (0 + 1)", "test_parallel.py -k logits_equal_single_process", "every rank reads rank 0's columns of wo and w2"),
    Mutation("load-pieces-overlap", "checkpoint.py", r"piece\.offset \+ piece\.start \* piece\.row_bytes",
             "piece.offset", "test_model.py -k in_pieces", "each piece of a large tensor reads the tensor's first rows"),
    Mutation("compile-pays-reversed", "decode.py", r"COMPILE_SAVES_S_PER_LAYER_STEP > COMPILE_COSTS_S",
             "COMPILE_SAVES_S_PER_LAYER_STEP < COMPILE_COSTS_S", "test_decode.py -k pays", "a one-shot run compiles, a long one does not"),
    # --- the command line, its launcher and a run's state --------------------------------
    Mutation("launcher-repeats-lines", "launch.py", r"if line\.rstrip\(\"\\n\"\) not in seen:", "if True:",
             "test_parallel.py -k error_of_every_rank", "each rank's copy of one error line is printed"),
    Mutation("launcher-names-no-stopped-rank", "launch.py", r"killed\.append\(r\)", "pass",
             "test_parallel.py -k 'stops_answering and mistral'", "the rank killed for not ending is not named"),
    Mutation("ranks-outlive-a-killed-launcher", "launch.py", r"\.prctl\(PR_SET_PDEATHSIG, signal\.SIGKILL\)", ".getpid()",
             "test_parallel.py -k 'kill_ends and SIGKILL'", "ranks run on after their launcher was killed"),
    Mutation("stage-runner-not-kept", "stage.py", r"found = self\.runners\[key\] = Runner\(", "found = Runner(",
             "test_generate.py -k reuses", "a Stage makes a new Runner (and graph) for every stream on the same cache"),
    Mutation("chat-cache-cut-by-max-context", "main.py", r"max_context if window is None else window", "max_context",
             "test_bad_input.py -k windowed_model", "a windowed model's chat cache is cut to --max_context slots"),
    Mutation("chat-line-unbounded", "main.py", r"if len\(text\) > MAX_LINE:", "if False:",
             "test_bad_input.py -k endless", "an endless input line is read on"),
    Mutation("help-runs-the-command", "main.py", r"if name in COMMANDS and any\(a in HELP", "if False and any(a in HELP",
             "test_bad_input.py -k help_after", "--help after a prompt runs the model first"),
    Mutation("expert-parallel-counts-others", "kernels.py", r"return \(swiglu\(y\) if glu else y\) \* held\[:, None\]", "return swiglu(y) if glu else y",
             "test_parallel.py -k 'expert_parallel and P1xT2'", "an expert-parallel rank adds another rank's pairs as its first expert's"),
    Mutation("expert-parallel-loads-local-names", "moe.py", r'f"experts\.\{e\}\.w1": F', 'f"experts.{i}.w1": F',
             "test_parallel.py -k 'expert_parallel and P1xT2'", "an expert-parallel rank reads the first experts' w1 from the checkpoint, not its own"),
    Mutation("prefill-cudnn-for-new-shapes", "attention.py", r"if shape in _shapes_seen:", "if True:",
             "test_attention.py -k recurs", "a one-shot run's new prompt length waits for cuDNN to build its plan"),
    Mutation("prewarm-shape-remembered", "attention.py", r"    if remember:\n        _shapes_seen", "    if True:\n        _shapes_seen",
             "test_attention.py -k recurs", "prewarm's warm-up makes a real prompt of its length wait for cuDNN's plan"),
    Mutation("expert-parallel-switch-ignored", "main.py", r"if expert_parallel and num_tensor_ranks == 1:", "if False:",
             "test_bad_input.py -k expert_parallel_without", "--expert_parallel without tensor ranks runs one process, silently"),
    Mutation("torchrun-copies-unchecked", "main.py", r"if world_size == 1 and started != \"1\"", "if False and started != \"1\"",
             "test_bad_input.py -k torchrun_around", "torchrun's processes each run a single-process command, interleaved"),
    Mutation("bind-error-without-the-os-reason", "main.py", r"return plain_error\.strerror or str\(e\)", "return str(e)",
             "test_serve.py -k port_in_use", "on Python 3.13, an address not of this machine fails without the OS's reason"),
    Mutation("ctrl-c-during-imports-unhandled", "__main__.py", r"quiet = _quit if previous", "quiet = previous if previous",
             "test_bad_input.py -k start_up", "Ctrl-C while the command line imports shows a traceback"),
    Mutation("tied-embeddings-not-copied", "hf.py", r"state\[\"output\.weight\"\] = state\[\"tok_embeddings\.weight\"\]\.clone\(\)", "pass",
             "test_convert.py -k tied", "a tied-embeddings HF model does not convert"),
    Mutation("quantize-skips-the-tokenizer", "quantize.py", r"check_vocabulary\(src, load_tokenizer\(src\), args\.vocab_size\)", "pass",
             "test_quantize.py -k working_tokenizer", "quantize copies a broken tokenizer and reports success"),
    # --- every input gets a clear answer (issue 25) ---------------------------------------
    Mutation("kv-cache-without-headroom", "cache.py", r"HEADROOM = 0\.2", "HEADROOM = 0.0",
             "test_bad_input.py -k leaves_room", "the cache may take all free memory, and the system kills the run"),
    Mutation("cpu-attention-copies-uncounted", "cache.py", r"\(1 \+ overhead\)", "(1 + 0 * overhead)",
             "test_bad_input.py -k leaves_room", "the CPU attention's float32 copies are left out of the cache check"),
    Mutation("router-rows-unchecked", "checkpoint.py", r"if args\.moe is not None:\n        implied", "if False:\n        implied",
             "test_bad_input.py -k 'does_not_match and experts'", "num_experts: 1000000 is allocated (or built) before the file is read"),
    Mutation("convert-writes-integer-tensors", "hf.py", r"if not w\.is_floating_point\(\):", "if False:",
             "test_convert.py -k 'bad_tensors and integers'", "convert writes integer weights, a folder that does not load"),
    Mutation("lora-merges-integers", "lora.py", r"if not t\.is_floating_point\(\):", "if False:",
             "test_lora.py -k integers", "a LoRA adapter of integers merges, and the model generates nonsense"),
    Mutation("prompt-like-a-folder-unexplained", "main.py", r"if folder != DEFAULT_MODEL and not is_dir\(folder\):", "if False:",
             "test_cli.py -k prompt-like-a-folder", "generate \"print(1/2)\" says only that no prompt was given"),
    Mutation("progress-rewritten-into-a-log", "main.py", r"if done < total and not self\.live:", "if False:",
             "test_bad_input.py -k into_a_log", "a load's progress into a log is every update run together on one line"),
    Mutation("unreadable-folder-called-output-failure", "main.py", r"if e\.filename is not None:", "if False:",
             "test_bad_input.py -k 'may_not_be_read and folder'", "a folder without read permission reads 'cannot write the output'"),
    # --- speculative decoding ------------------------------------------------------------
    Mutation("lookup-index-keeps-first-occurrence", "speculate.py", r"self\.follows\[tuple\(history\[p - n : p\]\)\] = p",
             "self.follows.setdefault(tuple(history[p - n : p]), p)", "test_speculate.py -k lookup_index",
             "prompt lookup proposes what followed the earliest occurrence, not the latest"),
    Mutation("lookup-index-holds-the-suffix", "speculate.py", r"for p in range\(self\.indexed, len\(history\)\)",
             "for p in range(self.indexed, len(history) + 1)", "test_speculate.py -k lookup_index",
             "the last n-gram finds itself, which nothing follows yet"),
    Mutation("lookup-proposes-nothing", "speculate.py", r"return list\(history\[after : after \+ k\]\)", "return []",
             "test_speculate.py -k keeps_proposals", "prompt lookup finds the n-gram but proposes nothing: correct, and no faster"),
    Mutation("speculation-without-lookahead-slots", "speculate.py", r"stage\.caches\(\[B\], longest, max_tokens, lookahead=k\)",
             "stage.caches([B], longest, max_tokens, lookahead=0)",
             "test_speculate.py -k greedy_speculation", "proposals written ahead overwrite positions still in the window"),
    Mutation("speculation-keeps-one-proposal-too-many", "speculate.py", r"cache\.rewind\(b, before\[b\] \+ 1 \+ accepted\)",
             "cache.rewind(b, before[b] + 2 + accepted) if before[b] + 2 + accepted <= cache.lengths[b] else None",
             "test_speculate.py -k greedy_speculation", "the first rejected proposal stays in the cache"),
    Mutation("speculation-accepts-every-proposal", "speculate.py", r"keep = choice == flat\n", "keep = choice == choice\n",
             "test_speculate.py -k greedy_speculation", "greedy speculation keeps proposals the model would not choose"),
    Mutation("speculation-accept-rule-reversed", "speculate.py", r"\.squeeze\(-1\) < probs\.gather", ".squeeze(-1) > probs.gather",
             "test_speculate.py -k target_distribution", "a proposal is kept with probability 1 - p(x)"),
    Mutation("draft-accept-rule-ignores-q", "speculate.py", r"keep = uniform \* proposed\.gather", "keep = uniform + 0 * proposed.gather",
             "test_speculate.py -k 'with_a_draft_draws'", "a draft's proposal is kept with probability p(x), not min(1, p(x) / q(x))"),
    Mutation("speculation-tally-counts-steps-as-rows", "speculate.py", r'\("rows", len\(rows\)\)', '("rows", 1)',
             "test_cli.py -k speculate", "the timing line's tokens a row per verify step counts every step as one row"),
    Mutation("verify-step-ignores-nan", "speculate.py", r"if not all\(finite_at\):", "if False:",
             "test_speculate.py -k turn_nan", "a verify step's non-finite logits go unnoticed"),
    Mutation("verify-step-logprob-of-the-other-token", "speculate.py", r"new_logprobs\.append\(lp_choice_at\[at\]\)", "new_logprobs.append(lp_proposed_at[at])",
             "test_speculate.py -k greedy_speculation", "a verify step gives the model's own token the log-probability of the proposal it replaced"),
    Mutation("decode-mask-on-lookahead-rows", "cache.py", r"reads_filled = sliding_window is None or size <= sliding_window", "reads_filled = True",
             "test_speculate.py -k greedy_speculation", "a step of no proposals reads a whole W + k row, past the window"),
    Mutation("lookahead-rewind-as-without", "cache.py", r"length >= written - \(self\.size - reach\) - 1", "length >= written - 1",
             "test_speculate.py -k lookahead", "a cache with lookahead slots starts a row over after taking k tokens back"),
    # --- the serving engine, the server, streamed text -------------------------------------
    Mutation("placeholder-reads-stale-keys", "engine.py", r">= min\(PLACEHOLDER_KEYS, self\.cache\.size\)", ">= self.cache.size",
             "test_engine.py -k 'reads_few_keys or window_less_cache_starts_over'", "a free row's placeholder reads the keys its finished request left, every step"),
    Mutation("serve-reads-a-stopped-choice", "serve.py", r"                if i not in running:  # news sent for a choice that a stop string ended, before the engine heard of it\n                    continue\n", "",
             "test_serve.py -k stops_early", "a choice ended by a stop string is handed the engine's later news (a 500 where n > 1)"),
    Mutation("serve-zero-logit-bias-refused", "openai_api.py", r'if name == "logit_bias" and isinstance', "if False and isinstance",
             "test_serve.py -k neutral_values", "a logit_bias of zeros, which changes nothing, is refused"),
    Mutation("serve-logprobs-past-the-stop", "openai_api.py", r"if self\.finish_reason is not None and not self\.cut:", "if True:",
             "test_serve.py -k cuts_the_text", "log-probabilities come for tokens past a stop string's cut, and for held text"),
    Mutation("serve-developer-refused", "openai_api.py", r'\("system", "developer", "user", "assistant"\)', '("system", "user", "assistant")',
             "test_serve.py -k developer", "a developer message (OpenAI's name for the system's) is refused"),
    Mutation("logprobs-bytes-of-u-fffd", "openai_api.py", r"return list\(token_text\(tokenizer, previous, token\)\.encode\(\) if raw is None else raw\)",
             "return list(token_text(tokenizer, previous, token).encode())",
             "test_tokenizer.py -k token_bytes", "a byte token's logprobs `bytes` are U+FFFD's, not the byte it stands for"),
    Mutation("logprobs-offset-from-the-answer", "openai_api.py", r"\[len\(self\.completion\.prompt_text\) \+ at for at in starts\]", "starts",
             "test_serve.py -k cuts_the_text", "completions' text_offset counts from the answer's start, not the prompt's (OpenAI's)"),
    Mutation("logprobs-ends-from-token-texts", "openai_api.py", r"            self\.ends\.append\(decoded\)",
             "            self.ends.append(at + len(token_text(self.completion.tokenizer, tokens[n - 2] if n > 1 else prompt[-1], tokens[n - 1])))",
             "test_serve.py -k several_tokens", "where each token's text ends is summed from the tokens' own texts (U+FFFD per byte token, no space after [/INST])"),
    Mutation("engine-ignores-nan", "engine.py", r"if not all\(ok\) and", "if False and",
             "test_engine.py -k turn_nan", "the engine samples from NaN logits without a word"),
    Mutation("engine-warm-up-one-bucket", "engine.py", r"n = min\(2 \* n, len\(self\.rows\)\)", "n = len(self.rows)",
             "test_engine.py -k warm_up", "the warm-up captures the first and the last bucket only"),
    Mutation("engine-warm-up-leaves-its-rows", "engine.py", r"        self\.cache\.reset\(\)\n        return time", "        return time",
             "test_engine.py -k warm_up", "the warm-up's placeholder tokens stay in the cache"),
    Mutation("engine-fails-again-after-a-failure", "engine.py", r"if not all\(ok\) and any\(not r\.finished for r in requests\):",
             "if not all(ok):", "test_engine.py -k turn_nan",
             "after NaN logits fail the requests, the next call fails the next request too (it reads the failed ones' last call)"),
    Mutation("engine-feeds-a-stale-token", "engine.py", r"self\.last\[slice\(len\(rows\)\) if every else to_device\(rows, device\)\] = tokens\.to\(device\)\.clamp\(min=0\)",
             "pass", "test_engine.py -k come_and_go", "the next call feeds each row a token from before the last one sampled"),
    Mutation("engine-chunk-call-feeds-zeros", "engine.py", r"ids_on_device\[to_device\(last_at, device\)\] = ", "_ = ",
             "test_engine.py -k come_and_go", "a chunk call's decoding rows feed token 0, not their last token"),
    Mutation("sampling-step-reads-its-flag", "sampling.py", r"    if isinstance\(temperature, torch\.Tensor\) or temperature > 0:\n        logits = torch\.where\(finite, logits, 0\.0\)",
             "    if (isinstance(temperature, torch.Tensor) or temperature > 0) and bool(finite):\n        pass",
             "test_generate.py -k reads_nothing", "a sampling step reads its finite flag (a wait for the GPU every step)"),
    Mutation("engine-row-not-reset", "engine.py", r"r\.row = b\n\s+self\.cache\.reset\(b\)", "r.row = b",
             "test_engine.py -k come_and_go", "a request takes a free row where its predecessor's tokens still count"),
    Mutation("engine-prompt-read-a-token-a-call", "engine.py", r"r\.read = min\(r\.read \+ len\(tokens\)", "r.read = min(r.read + 1",
             "test_engine.py -k come_and_go", "a prompt's chunk is fed, but counted as one token read"),
    Mutation("engine-decode-logits-of-the-first-rows", "engine.py", r"logits\[to_device\(\[b for b, _ in fed\], logits\.device\)\]", "logits[: len(fed)]",
             "test_engine.py -k come_and_go", "a decode step samples the busy rows from rows 0..n-1, free ones included"),
    Mutation("engine-no-generator-per-request", "engine.py", r"request\.generator = torch\.Generator\(self\.model\.device\)\.manual_seed\(request\.seed\)",
             "request.generator = None", "test_engine.py -k seeded", "a seeded request draws from the global generator"),
    Mutation("engine-eos-not-the-end", "engine.py", r"if token == r\.eos_id:", "if token == r.eos_id and False:",
             "test_engine.py -k eos", "eos is generated like any token"),
    Mutation("streamed-text-without-context", "text.py", r"return text\[len\(before\) :\]", "return self.tokenizer.decode(every[start:])",
             "test_tokenizer.py -k streamed_pieces", "each piece decoded alone: sentencepiece drops the space it starts with"),
    Mutation("stop-string-not-held-back", "openai_api.py", r"keep = max\(\(k for s", "keep = 0 * max((k for s",
             "test_serve.py -k stop_strings", "streamed text that may start a stop string goes out before it is known"),
    Mutation("stop-string-kept", "openai_api.py", r"self\.held\[: min\(found\)\]", "self.held",
             "test_serve.py -k stop_strings", "the text is not cut where the stop string starts"),
    Mutation("client-gone-keeps-its-row", "serve.py", r"for i in running:  # the client left, or the model failed\n\s+self\.worker\.finish\(requests\[i\]\)",
             "for i in running:\n                pass", "test_serve.py -k leaves_mid_stream", "a request runs on after its client has gone"),
    Mutation("admitted-when-it-runs", "serve.py", r"self\.admitted\.update\(out\)", "pass",
             "test_serve.py -k full_queue", "requests that arrive together all pass --max_queue (counted once they run)"),
    Mutation("no-address-check", "main.py", r"        check_address\(host, port\)\n", "        pass\n",
             "test_serve.py -k port_in_use", "a port in use is found after loading the model, as uvicorn's traceback"),
    Mutation("fused-rotary-sign", "kernels.py", r"a \* cos\[None, :\] - b \* sin\[None, :\]", "a * cos[None, :] + b * sin[None, :]",
             "test_decode.py -k fused_norm_and_rotary", "the rotary kernel rotates the wrong way", cuda=True),
    Mutation("fused-norm-no-weight", "kernels.py", r"\(normed \* w\)\.to", "(normed).to",
             "test_decode.py -k fused_norm_and_rotary", "the RMSNorm kernel leaves out its weight", cuda=True),
]


@dataclass
class Outcome:
    name: str
    verdict: str  # "caught", or why not: "NOT CAUGHT (...)"; with --baseline "passes" / "FAILS"
    detail: str
    seconds: float


def run(mutation: Mutation, env: dict[str, str], baseline: bool) -> Outcome:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        copy = Path(tmp) / "mistral"
        # The shipped model's folder is data: linked, not copied.
        shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "default_model"))
        (copy / "default_model").symlink_to(PACKAGE / "default_model")
        if not baseline:
            mutation.apply(copy)
        report = Path(tmp) / "report.jsonl"
        path = os.pathsep.join(filter(None, [tmp, str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "pytest", "-q", "-p", "mutate", "-p", "no:cacheprovider", *mutation.pytest_args()]
        try:
            done = subprocess.run(command, cwd=tmp, env={**os.environ, **env, "PYTHONPATH": path, REPORT: str(report)},
                                  capture_output=True, text=True, timeout=600)  # fmt: skip
        except subprocess.TimeoutExpired:
            return Outcome(mutation.name, "NOT CAUGHT (timeout)" if not baseline else "FAILS (timeout)", "", time.perf_counter() - start)
        records = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
        imported = next((r["mistral"] for r in records if "mistral" in r), None)
        if imported is None or not Path(imported).is_relative_to(copy):
            raise SystemExit(f"{mutation.name}: the tests imported mistral from {imported}, not the copy in {tmp}\n{done.stdout[-3000:]}")
    seconds = time.perf_counter() - start
    failures = [r for r in records if "test" in r]
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr.strip()[-300:]
    if baseline:
        ok = done.returncode == 0
        return Outcome(mutation.name, "passes" if ok else "FAILS", summary if ok else done.stdout[-3000:], seconds)
    caught = [r for r in failures if r["how"] == "assert"]
    if caught:
        return Outcome(mutation.name, "caught", f"{caught[0]['test']}: {caught[0]['error']}", seconds)
    if failures:
        crashes = ", ".join(sorted({f"{r['error']} in {r['test']}" for r in failures}))
        return Outcome(mutation.name, "NOT CAUGHT (crashed)", crashes, seconds)
    if done.returncode != 0:  # no test failed, yet pytest did not pass: a collection error, a bad -k
        return Outcome(mutation.name, "NOT CAUGHT (pytest error)", done.stdout[-2000:] + done.stderr[-2000:], seconds)
    return Outcome(mutation.name, "NOT CAUGHT (all passed)", summary, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations, after checking that each pattern applies")
    parser.add_argument("--baseline", action="store_true", help="run each mutation's tests on the unmutated copy: they must pass")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set for the test runs, e.g. MISTRAL_TEST_DEVICE=cuda")
    options = parser.parse_args()
    by_name = {m.name: m for m in MUTATIONS}
    unknown = [n for n in options.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutations {unknown}; --list shows them")
    env = dict(item.split("=", 1) for item in options.env)
    on_cuda = env.get("MISTRAL_TEST_DEVICE", os.environ.get("MISTRAL_TEST_DEVICE", "cpu")).startswith("cuda")
    # All: those the test device can see (a CUDA kernel's bugs only on a GPU).
    chosen = [by_name[n] for n in options.names] or [m for m in MUTATIONS if on_cuda or options.list or not m.cuda]

    try:  # every pattern applies, before anything runs
        for m in chosen:
            m.mutated((PACKAGE / m.file).read_text())
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if options.list:
        for m in chosen:
            gpu = " (GPU only)" if m.cuda else ""
            print(f"{m.name:36} mistral/{m.file:13} {m.bug}{gpu}\n{'':36} tests: {m.tests}")
        return

    outcomes = []
    for m in chosen:
        outcome = run(m, env, options.baseline)
        outcomes.append(outcome)
        print(f"{outcome.verdict:26} {m.name:36} {outcome.seconds:5.1f} s  {outcome.detail[:160]}", flush=True)
    good = "passes" if options.baseline else "caught"
    n_good = sum(o.verdict == good for o in outcomes)
    print(f"\n{n_good} of {len(outcomes)} {good}")
    for o in outcomes:
        if o.verdict != good:
            print(f"\n--- {o.name}: {o.verdict}\n{o.detail}")
    sys.exit(0 if n_good == len(outcomes) else 1)


# --- the pytest plugin (-p mutate), active only in the runs above --------------------


def _record(entry: dict[str, Any]) -> None:
    with open(os.environ[REPORT], "a") as f:
        f.write(json.dumps(entry) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    if REPORT in os.environ:
        import mistral

        _record({"mistral": mistral.__file__})


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    excinfo: Optional[pytest.ExceptionInfo] = call.excinfo
    if REPORT in os.environ and report.failed and excinfo is not None:
        assertion = call.when == "call" and excinfo.errisinstance((AssertionError, pytest.fail.Exception))
        message = str(excinfo.value).strip().splitlines()[0][:200] if str(excinfo.value).strip() else ""
        _record({"test": item.nodeid, "how": "assert" if assertion else "crash", "error": f"{excinfo.typename}: {message}"})
        if assertion:
            item.session.shouldstop = "an assertion saw the mutation"
    return report


if __name__ == "__main__":
    main()
