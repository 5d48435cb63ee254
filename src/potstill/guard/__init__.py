"""Guard: protect a served teacher and find out when it was distilled.

- `serve`: an OpenAI-compatible server with API keys, rate limits, a query log and the watermark;
- `watermark`: a secret-keyed green-list (KGW-style) watermark applied while sampling, and the
  exact binomial test that detects it in text;
- `detect`: was suspect S trained on our watermarked outputs ("radioactivity")? Scores S's own
  next-token predictions (open weights) or S's generations (text only) and reports a p-value;
- `monitor`: which API keys look like extraction, from the query log.
"""
