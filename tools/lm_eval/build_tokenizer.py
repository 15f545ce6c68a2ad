"""Builds a Hugging Face tokenizer folder from a SentencePiece .model file, offline, so that
lm_eval's `tokenizer_backend=huggingface` encodes exactly as the project's tokenizer does.

    python build_tokenizer.py SRC.model OUT_DIR [SRC.model OUT_DIR ...]

Runs in lm_eval's environment (it needs transformers, sentencepiece and protobuf).

transformers 5.x: `TokenizersBackend.from_pretrained(dir holding tokenizer.model)` converts the
SentencePiece proto with SpmConverter.build_tokenizer_from_spm_proto, which follows the model's
normalizer spec (dummy prefix, whitespace escaping, extra-space removal), ranks BPE merges by
piece score, isolates user-defined pieces (Split pre-tokenizer + BPE ignore_merges) and keeps
byte fallback.  We add: split_special_tokens=True (text such as "[EOS]" or "</s>" is encoded as
plain text, as sp.encode does), add_bos_token=add_eos_token=False, pad_token from the model.
The output (tokenizer.json + tokenizer_config.json) needs neither sentencepiece nor network.

One fix-up of the saved tokenizer.json: with ignore_merges=true the BPE model emits a
pre-token that equals a vocab key as that token, so a chunk that is exactly a control/unknown
key (e.g. "[EOS]" right after "\\n", a digit or a tab, which are user-defined pieces and split
off) became the control id, where sp.encode spells it out ("[", "EOS", "]").  For each such
key we append a Split pre-tokenizer, anchored to the whole chunk, that cuts it where
sp.encode does, so every part maps to the same vocab piece.  Keys that sp encodes to the
unknown piece (the demo's "</s>", whose characters it has no piece for) cannot be fixed that
way and are reported; text the demo has no pieces for is refused by the server anyway.
"""
import json
import os
import re
import shutil
import sys
import tempfile

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from transformers import TokenizersBackend


def build(model_file: str, out_dir: str) -> None:
    sp = spm.SentencePieceProcessor(model_file=model_file)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(model_file, os.path.join(tmp, "tokenizer.model"))
        pad = {"pad_token": sp.id_to_piece(sp.pad_id())} if sp.pad_id() >= 0 else {}
        tok = TokenizersBackend.from_pretrained(
            tmp, add_bos_token=False, add_eos_token=False, split_special_tokens=True,
            clean_up_tokenization_spaces=False, **pad)
        tok.save_pretrained(out_dir)
    split_control_chunks(model_file, os.path.join(out_dir, "tokenizer.json"))
    tok = TokenizersBackend.from_pretrained(out_dir)
    print(f"{model_file} -> {out_dir}: vocab {len(tok)}, bos {tok.bos_token}={tok.bos_token_id}, "
          f"eos {tok.eos_token}={tok.eos_token_id}, unk {tok.unk_token}={tok.unk_token_id}, "
          f"pad {tok.pad_token}={tok.pad_token_id}")


def split_control_chunks(model_file: str, tokenizer_json: str) -> None:
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    sp = spm.SentencePieceProcessor(model_file=model_file)
    with open(tokenizer_json, encoding="utf-8") as f:
        data = json.load(f)
    model = data["model"]
    if not model.get("ignore_merges"):
        return
    user = [i for i, p in enumerate(proto.pieces) if p.type == p.USER_DEFINED
            and sp.encode(p.piece) in ([i], [sp.piece_to_id("\u2581"), i])]
    if not user:
        return
    prefix = proto.pieces[user[0]].piece  # a piece that sp emits whole: what follows is a chunk
    alternatives = []
    for _i, p in enumerate(proto.pieces):
        if p.type not in (p.CONTROL, p.UNKNOWN):
            continue
        key = p.piece
        ids = sp.encode(prefix + key)
        ids = ids[ids.index(user[0]) + 1:]
        pieces = [sp.id_to_piece(t) for t in ids]
        if "".join(pieces) != key or any(sp.is_unknown(t) or sp.is_control(t) for t in ids):
            print(f"  note: chunk {key!r} encodes to {pieces} in sentencepiece; left as is")
            continue
        start = len(pieces[0])
        for piece in pieces[1:-1]:  # isolating the inner parts cuts the chunk at every boundary
            alternatives.append(f"(?<=\\A{re.escape(key[:start])}){re.escape(piece)}"
                                f"(?={re.escape(key[start + len(piece):])}\\z)")
            start += len(piece)
        if len(pieces) == 2:  # no inner part: isolate the first one
            alternatives.append(f"\\A{re.escape(pieces[0])}(?={re.escape(pieces[1])}\\z)")
        print(f"  chunk {key!r} -> {pieces}")
    if not alternatives:
        return
    split = {"type": "Split", "pattern": {"Regex": "|".join(alternatives)},
             "behavior": "Isolated", "invert": False}
    pre = data["pre_tokenizer"]
    if pre is None:
        data["pre_tokenizer"] = split
    elif pre["type"] == "Sequence":
        pre["pretokenizers"].append(split)
    else:
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [pre, split]}
    with open(tokenizer_json, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or len(args) % 2:
        sys.exit(__doc__)
    for src, out in zip(args[::2], args[1::2], strict=False):
        build(src, out)
