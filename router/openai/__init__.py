"""The OpenAI API as the router's second front door (``python -m router --http-port``).

An aiohttp application in the router's own event loop (``app``) turns OpenAI
requests (``schema``, validated once) into the same typed calls the gRPC front
door makes, through the same ``FrontDoor`` (authentication, rate limits, ids,
deadline) and the same core (queues, breakers, retries, trust layer, metering).
Chat messages become a prompt through the model's chat template (``prompts``);
pipelines answer as models (``pipelines``). Errors are OpenAI's error JSON
(``errors``).
"""
