#!/bin/bash
# A curl session against a running dsmi service, on real CUHK03 images: the gallery holds one
# camera-A image of each of N people of the `val` split, each person's first camera-B image is
# the probe. Prints each probe's rank of the true person and how often it is first / in the top 5.
#   examples/curl_session.sh                 # N=20, http://127.0.0.1:8000, ../shared/data
#   N=100 URL=http://host:8000 DSMI_DATA=/data examples/curl_session.sh
# Needs curl and python3. Deletes and refills the gallery named by GALLERY (default "demo").
set -euo pipefail
URL=${URL:-http://127.0.0.1:8000}
N=${N:-20}
GALLERY=${GALLERY:-demo}
DATA=${DSMI_DATA:-$(dirname "$0")/../../shared/data}/cuhk03-labeled/val
[ -d "$DATA" ] || { echo "no CUHK03 val images at $DATA: set DSMI_DATA" >&2; exit 2; }
auth=()
[ -n "${DSMI_API_KEY:-}" ] && auth=(-H "X-API-Key: $DSMI_API_KEY")

curl -sf "${auth[@]}" -X DELETE "$URL/v1/galleries/$GALLERY" > /dev/null || true
upload=()
for i in $(seq 0 $((N - 1))); do
  p=$(printf %04d "$i")
  f=$(ls "$DATA/${p}"_0[0-4].jpg | head -1)
  upload+=(-F "images=@$f" -F "person_id=$p" -F "camera_id=camA")
done
curl -sf "${auth[@]}" -X POST "$URL/v1/galleries/$GALLERY/images" "${upload[@]}" |
  python3 -c 'import json, sys; r = json.load(sys.stdin); print("stored", r["count"], "images")'

first=0; top5=0
for i in $(seq 0 $((N - 1))); do
  p=$(printf %04d "$i")
  f=$(ls "$DATA/${p}"_0[5-9].jpg | head -1)
  rank=$(curl -sf "${auth[@]}" -X POST "$URL/v1/galleries/$GALLERY/query" \
           -F "image=@$f" -F top_k=5 -F camera_id=camB -F exclude_same_camera=true |
         python3 -c "import json, sys; r = json.load(sys.stdin)['results']
print(next((x['rank'] for x in r if x['person_id'] == '$p'), 0))")
  [ "$rank" = 1 ] && first=$((first + 1))
  [ "$rank" != 0 ] && top5=$((top5 + 1))
  echo "probe $p ($(basename "$f")): true person at rank ${rank/#0/>5}"
done
echo "true person first: $first/$N, in the top 5: $top5/$N"
