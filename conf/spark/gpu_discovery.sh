#!/usr/bin/env bash
# Spark resource discovery: print the GPUs of this node as Spark expects,
# {"name": "gpu", "addresses": ["0", "1", ...]}.
ids=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | sed 's/ //g' | sed 's/.*/"&"/' | paste -sd, -)
echo "{\"name\": \"gpu\", \"addresses\": [${ids}]}"
