#!/usr/bin/env bash
# Re-split the staged parts (../shared/device/stage.sh writes .stage/part-1..N of 48 MiB) into pieces of SIZE MiB, in
# .stage/q-1..M, so that one piece and the project's tracked files fit one 64 MiB call (the ninth session's tree was
# 17 MiB: 48 + 17 did not). Upload as before: carry .stage/q-I, run `bash .stage/q-I/unstage.sh I`.
#   bash bench/restage.sh [SIZE]      (default: 64 MiB less the files a call carries now, less 4)
# A call carries the working tree's files that git does not ignore, most of them published results (49 MiB in the
# sixteenth session): with docs/results moved out of the tree for the uploads (and back after), the pieces are ~5x
# larger and ~5x fewer; the campaigns must then not seed from docs/results.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=$({ git ls-files -z -co --exclude-standard | xargs -0 stat -c %s -- 2>/dev/null || true; } \
  | awk '{s+=$1} END {print s+0}')  # the files present (a file moved aside is not carried)
tree_mib=$(( (tree >> 20) + 1 ))
size=${1:-$((60 - tree_mib))}
parts=$(ls -d .stage/part-* | sort -t- -k2 -n)
tmp=$(mktemp -d)
cat $(for p in $parts; do echo $p/blob; done) | split -b ${size}M -d -a 2 - $tmp/b
rm -rf .stage/q-*
n=$(ls $tmp | wc -l); i=0
for f in $(ls $tmp | sort); do
  i=$((i + 1)); mkdir -p .stage/q-$i; mv $tmp/$f .stage/q-$i/blob; echo $n > .stage/q-$i/total
  cp .stage/part-1/unstage.sh .stage/q-$i/
done
rmdir $tmp
echo "files a call carries ${tree_mib} MiB; $n pieces of ${size} MiB in .stage/q-1..$n"
