"""A grammar-compiling process (`python -m grok.structured.compile_worker SETUP`).

Compiling some grammars takes seconds or more memory than a server can spare (a regex such
as `.{0,200}x` is a large automaton), and xgrammar's compiler cannot be interrupted, so it
runs here, where the parent can kill it (`grok.structured.compiler`). Protocol: SETUP is
JSON {tokenizer, pad, eos, vocab_size, memory_bytes}; the process writes one line
{"ready": true}, then reads one spec per line (`grok.structured.spec.to_json`) and answers
each with one line, {"grammars": xgrammar's serialized grammars (see
`grok.structured.grammar.build`)} or {"error": message}.
"""

from __future__ import annotations

import json
import os
import resource
import sys


def main() -> None:
    # Replies go to the original stdout; anything a library prints goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    setup = json.loads(sys.argv[1])
    import xgrammar as xgr

    from grok.errors import GrokError
    from grok.structured.grammar import Vocabulary, build, tidy
    from grok.structured.spec import from_json
    from grok.tokenizer import Tokenizer

    tokenizer = Tokenizer(setup["tokenizer"], pad_id=setup["pad"], eos_id=setup["eos"])
    vocab = Vocabulary(tokenizer, setup["vocab_size"])
    compiler = xgr.GrammarCompiler(vocab.info, max_threads=1, cache_enabled=False)
    if setup.get("memory_bytes"):
        # Address space beyond what the process holds now: a compile that wants more fails
        # (and is reported) instead of taking the machine's memory.
        with open("/proc/self/statm") as f:
            held = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = held + setup["memory_bytes"]
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def reply(message: dict) -> None:
        out.write(json.dumps(message).encode() + b"\n")
        out.flush()

    reply({"ready": True})
    for line in sys.stdin.buffer:
        try:
            spec = from_json(json.loads(line))
            reply({"grammars": [g.serialize_json() for g in build(spec, vocab, compiler)]})
        except GrokError as e:
            reply({"error": str(e)})
        except MemoryError:
            reply({"error": "compiling it needs more memory than the compiler may use"})
        except (RuntimeError, ValueError, TypeError) as e:
            reply({"error": tidy(str(e))})


if __name__ == "__main__":
    main()
