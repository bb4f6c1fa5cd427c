"""The Responses API (POST/GET/DELETE /v1/responses), bridged onto chat completions.

request.py parses a Responses request and builds its chat completions body; output.py and
events.py turn the chat answer (or its chunks) into the Response object (or its stream events);
create.py is the POST view; store.py and retrieve.py keep and serve stored responses.
See docs/responses.md.
"""
