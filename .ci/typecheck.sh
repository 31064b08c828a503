#!/usr/bin/env bash
# Type-checks the kvrelay package with mypy, configured by pyproject.toml's [tool.mypy].
#
# The package is laid out as top-level folders that pyproject's package-dir maps onto kvrelay.<name>
# (kvkernels/ is kvrelay.kernels), which mypy cannot follow from a source tree. So this builds a
# symlink farm in a temporary directory, <tmp>/kvrelay/<name> -> <checkout>/<folder>, from the
# package-dir table of the checkout this script sits in, and checks `-p kvrelay` there.
# Error paths are printed relative to the checkout (kvkernels/x.py, not kvrelay/kernels/x.py).
# It also fails on a `type: ignore` without an error code and a reason after it on the same line
# (`# type: ignore[code]  # why`): mypy checks the code, not the reason.
# Exit status: non-zero on any error. MYPY_CACHE_DIR, if set, keeps mypy's cache between runs.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
FARM="$(mktemp -d)"
trap 'rm -rf "$FARM"' EXIT

# One "name folder" line per package-dir entry (kvrelay.kernels = kvkernels -> "kernels kvkernels").
MAPPING="$(python3 - "$ROOT/pyproject.toml" <<'EOF'
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
with open(sys.argv[1], "rb") as f:
    package_dir = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
for package, folder in sorted(package_dir.items()):
    prefix, _, name = package.partition(".")
    assert prefix == "kvrelay" and name and "." not in name, package
    print(name, folder)
EOF
)"

mkdir "$FARM/kvrelay"
SED_ARGS=()
FOLDERS=()
while read -r name folder; do
    ln -s "$ROOT/$folder" "$FARM/kvrelay/$name"
    SED_ARGS+=(-e "s#^kvrelay/$name/#$folder/#")
    FOLDERS+=("$folder")
done <<< "$MAPPING"

cd "$ROOT"
unexplained=$(grep -rnE --include='*.py' 'type: *ignore' "${FOLDERS[@]}" \
    | grep -vE 'type: *ignore\[[a-z, -]+\] +# *[^ ]' || true)
if [ -n "$unexplained" ]; then
    printf '%s\n' "$unexplained" | sed 's/$/  <- type: ignore[code] without a "# reason" after it/'
fi

cd "$FARM"
set +e
MYPYPATH="$FARM" python3 -m mypy --config-file "$ROOT/pyproject.toml" -p kvrelay > "$FARM/mypy.out" 2>&1
rc=$?
set -e
sed "${SED_ARGS[@]}" "$FARM/mypy.out"
if [ -n "$unexplained" ] && [ "$rc" -eq 0 ]; then
    rc=1
fi
exit "$rc"
