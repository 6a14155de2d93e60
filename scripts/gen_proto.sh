#!/usr/bin/env bash
# Regenerate the Python code for proto/ into clients/python/squire/api/.
# The proto package (squire.api.v1) equals the Python import path, so the
# generated imports need no rewriting. Never edit the output by hand.
#   scripts/gen_proto.sh          regenerate
#   scripts/gen_proto.sh --check  fail if the checked-in code is stale
set -euo pipefail
cd "$(dirname "$0")/.."
out=clients/python
check=0
[ "${1:-}" = "--check" ] && check=1
if [ $check = 1 ]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  out_dir=$tmp
else
  out_dir=$out
fi
python -m grpc_tools.protoc -Iproto \
  --python_out="$out_dir" --grpc_python_out="$out_dir" \
  --mypy_out="$out_dir" --mypy_grpc_out="$out_dir" \
  proto/squire/api/v1/*.proto
for d in squire/api squire/api/v1; do
  [ -f "$out_dir/$d/__init__.py" ] || echo '"""Generated from proto/ by scripts/gen_proto.sh. Do not edit."""' > "$out_dir/$d/__init__.py"
done
if [ $check = 1 ]; then
  if ! diff -r -x __pycache__ "$out_dir/squire/api" "$out/squire/api"; then
    echo "generated code is stale: run scripts/gen_proto.sh" >&2
    exit 1
  fi
  echo "generated code is up to date"
fi
