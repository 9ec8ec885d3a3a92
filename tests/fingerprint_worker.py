"""A fork server for the mutation test (tests/study/test_fingerprint.py): it imports the heavy
dependencies once (torch, transformers' Llama, kvpress, scipy, pandas) but never the project's
code, then for each request forks a child that imports knorm_lib and knorm_study from the given
copy of the code and runs ``python -m knorm_study.fingerprint`` there. A request is one JSON line
``{"code": dir, "args": [...], "out": file}`` on stdin; the answer is one line, the child's exit
status, on stdout."""
from __future__ import annotations

import json
import os
import sys


def _warm() -> None:
    import kvpress  # noqa: F401
    import pandas  # noqa: F401
    import scipy.stats  # noqa: F401
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=4))


def _child(request: dict) -> None:
    code = request["code"]
    sys.path.insert(0, code)
    os.chdir(code)
    with open(request["out"], "w") as fh:
        os.dup2(fh.fileno(), 1)
        from knorm_study import fingerprint

        fingerprint.main(request["args"])
        sys.stdout.flush()


def main() -> None:
    _warm()
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                _child(request)
            except BaseException as err:   # noqa: BLE001 (reported through the exit status)
                print(f"{type(err).__name__}: {err}", file=sys.stderr)
                status = 1
            os._exit(status)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    main()
