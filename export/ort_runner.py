"""Run ONNX files in whatever onnxruntime this interpreter has: the oldest one a board may run.

A standalone script (numpy and onnxruntime only, no bitfleet), so that it runs in a bare
environment holding another onnxruntime version (`export/runtimes.py`):

    python ort_runner.py INPUTS.npz OUT.npz MODEL.onnx [MODEL.onnx ...]

INPUTS.npz holds `pixels`; OUT.npz gets `logits_<i>` per model that ran, and `report` (JSON):
the onnxruntime version and, per model, "ok" or the error. Each file's own session settings
(metadata `bitfleet.ort_session_config`) are applied, as `export.runtime.session` does.
"""

import json
import sys

import numpy as np
import onnxruntime as ort

SESSION_CONFIG_KEY = "bitfleet.ort_session_config"


def _session(path: str) -> ort.InferenceSession:
    probe = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    config = probe.get_modelmeta().custom_metadata_map.get(SESSION_CONFIG_KEY, "{}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    for key, value in json.loads(config).items():
        opts.add_session_config_entry(key, str(value))
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def main(argv: list[str]) -> int:
    inputs, out, models = argv[0], argv[1], argv[2:]
    x = np.load(inputs)["pixels"]
    arrays: dict[str, np.ndarray] = {}
    status: dict[str, str] = {}
    for i, path in enumerate(models):
        try:
            sess = _session(path)
            name = sess.get_inputs()[0].name
            arrays[f"logits_{i}"] = np.concatenate(
                [sess.run(None, {name: x[j : j + 256]})[0] for j in range(0, len(x), 256)]
            )
            status[path] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure is the finding to report
            status[path] = f"{type(exc).__name__}: {exc}"[:500]
    report = {"onnxruntime": ort.__version__, "models": status}
    np.savez(out, report=np.array(json.dumps(report)), **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
