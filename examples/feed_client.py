#!/usr/bin/env python3
"""Follows a possync terminal's change feed, as a POS app would.

    python3 examples/feed_client.py http://127.0.0.1:9464 changes.jsonl

Each change the terminal commits is appended to the journal (one JSON line,
with its event id) and printed. The journal is also where the client keeps
its place: started again, it asks for the changes after the id on its last
line, so that a client killed at any moment misses nothing and sees nothing
twice (a line is written with one write call; a torn last line is dropped).
When the terminal answers `reload` (the client was away for longer than the
terminal keeps changes), an app reads its tables again; this client writes
a `reload` line and follows on.

Only Python's standard library: copy it into a POS app's tooling as it is.
"""

import argparse
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request


def last_event_id(journal):
    """The id of the last whole line of the journal, dropping a torn one."""
    try:
        with open(journal, "rb+") as file:
            data = file.read()
            whole = data[: data.rfind(b"\n") + 1]
            if len(whole) != len(data):
                file.truncate(len(whole))
    except FileNotFoundError:
        return None
    for line in reversed(whole.splitlines()):
        if line.strip():
            return json.loads(line)["event_id"]
    return None


def events(response):
    """Server-Sent Events from an HTTP response: (event, id, data) tuples."""
    event, event_id, data = "message", None, []
    for raw in response:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data or event != "message":
                yield event, event_id, "\n".join(data)
            event, event_id, data = "message", None, []
        elif line.startswith(":"):
            continue  # a keep-alive comment
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "id":
                event_id = value
            elif field == "data":
                data.append(value)


def follow(url, journal, quiet):
    out = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    delay = 0.5
    while True:
        request = urllib.request.Request(url.rstrip("/") + "/events")
        last = last_event_id(journal)
        if last is not None:
            request.add_header("Last-Event-ID", str(last))
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                for event, event_id, data in events(response):
                    if event == "error":
                        # The terminal cannot read its database: it says why.
                        print(f"feed: the terminal says: {data}", file=sys.stderr, flush=True)
                        continue
                    if event == "message":
                        change = json.loads(data)
                        line = {"event_id": int(event_id), **change}
                    elif event == "reload":
                        # An app reads its tables again here.
                        line = {"event_id": int(event_id), "reload": json.loads(data)}
                    elif event == "ready" and last is None:
                        # Nothing seen yet: start the journal at now.
                        line = {"event_id": int(event_id), "ready": True}
                    else:
                        continue
                    delay = 0.5
                    text = json.dumps(line, separators=(",", ":")) + "\n"
                    os.write(out, text.encode("utf-8"))
                    if not quiet:
                        print(text, end="", flush=True)
            # The stream ended (the terminal stopped, or told of an error).
            reason = "the stream ended"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            # Network faults, and a journal that cannot be written (a full
            # disk): nothing was kept of what could not be written, so it
            # comes again.
            reason = str(err)
        print(f"feed: {reason}; trying again in {delay:.1f} s", file=sys.stderr, flush=True)
        time.sleep(delay)
        delay = min(delay * 2, 10)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the terminal's status endpoint, e.g. http://127.0.0.1:9464")
    parser.add_argument("journal", help="the file the changes are appended to, and resumed from")
    parser.add_argument("--quiet", action="store_true", help="write the journal only")
    args = parser.parse_args()
    try:
        follow(args.url, args.journal, args.quiet)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
