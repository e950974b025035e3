"""Call the demo model that `aiaas up` serves, with the stock Triton client.

    python examples/triton_client.py [--url localhost:8001] [--model demo] [--batch 4]

Nothing here is aiaas-specific: the gateway speaks the KServe v2 / Triton gRPC protocol.
"""

from __future__ import annotations

import argparse

import numpy as np
import tritonclient.grpc as grpcclient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="localhost:8001", help="gateway address")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--api-key", default=None, help="when the gateway has authentication on")
    args = parser.parse_args()

    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else None
    client = grpcclient.InferenceServerClient(args.url)
    metadata = client.get_model_metadata(args.model, headers=headers)
    print(f"{metadata.name} versions {list(metadata.versions)}: "
          f"{[(i.name, i.datatype, list(i.shape)) for i in metadata.inputs]} -> "
          f"{[(o.name, o.datatype, list(o.shape)) for o in metadata.outputs]}")

    x = np.random.default_rng(0).normal(size=(args.batch, 10)).astype(np.float32)
    inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(args.model, [inp], outputs=[grpcclient.InferRequestedOutput("OUTPUT0")], headers=headers)
    scores = result.as_numpy("OUTPUT0")
    response = result.get_response()
    print(f"served by {response.model_name} version {response.model_version}")
    print(f"scores {scores.shape}, predicted classes {scores.argmax(axis=1).tolist()}")
    client.close()


if __name__ == "__main__":
    main()
