"""``jaxdp train`` that SIGKILLs itself at a named point: the crash half of ``tests/test_guards.py``.

    python tests/fault_runner.py POINT:N --config ... workdir=DIR [key=value ...]

POINT is where the process dies, N counts from 1:

* ``step:N``        right after the N-th noisy step is dispatched (it is still running
                    on the device, and the accountant has not counted it yet);
* ``checkpoint:N``  while the checkpoint of epoch N is being written: every file is in
                    orbax's temporary directory, the commit (rename) has not happened;
* ``eval:N``        inside the N-th evaluation pass (train and test accuracy: two per epoch).

Before dying it writes ``DIR/killed_at.json`` (what it was doing), so the test can check
that the kill landed in the phase it meant. Nothing here is imported by jaxdp.
"""

import json
import os
import signal
import sys


def _die(workdir: str, info: dict) -> None:
    with open(os.path.join(workdir, "killed_at.json"), "w") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    where, count = sys.argv[1].split(":")
    n = int(count)
    argv = sys.argv[2:]
    workdir = [a.split("=", 1)[1] for a in argv if a.startswith("workdir=")][-1]
    os.makedirs(workdir, exist_ok=True)

    import jaxdp.train.loop as loop_mod
    import jaxdp.train.setup as setup_mod

    calls = [0]
    if where == "step":
        make_private_step = setup_mod.make_private_step

        def patched(*args, **kwargs):
            private_step = make_private_step(*args, **kwargs)
            step = private_step.step_fn

            def step_then_die(state, *a):
                out = step(state, *a)  # dispatched asynchronously: still running when we die
                calls[0] += 1
                if calls[0] == n:
                    _die(workdir, {"point": "step", "step": n, "params_step_before": int(state.step)})
                return out

            private_step.step_fn = step_then_die
            return private_step

        setup_mod.make_private_step = patched
    elif where == "checkpoint":
        from orbax.checkpoint._src.path import atomicity

        finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize_or_die(self):
            if self._final_path.name == str(n):
                _die(workdir, {"point": "checkpoint", "epoch": n, "tmp": str(self._tmp_path)})
            return await finalize(self)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die
    elif where == "eval":
        evaluate = loop_mod.evaluate

        def evaluate_and_die(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                _die(workdir, {"point": "eval", "call": n})
            return evaluate(*args, **kwargs)

        loop_mod.evaluate = evaluate_and_die
    else:
        raise SystemExit(f"fault_runner: unknown point {where!r}; use step:N, checkpoint:N or eval:N")

    from jaxdp.cli import main as cli_main

    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
