"""Who sent a request, what they may use, and how tenants share a class.

- ``tenants.py``: the tenants file (tiers, tenants, SHA-256 digests of their
  keys) and the ``KeyRing`` that re-reads it when it changes and finds a key's
  tenant in constant time;
- ``limits.py``: token buckets for requests and tokens per minute, and the
  rate-limit headers OpenAI's clients read;
- ``ledger.py``: the one place all router replicas take quota from (a Serve
  deployment), and the router-side ``QuotaClient`` that leases from it in
  chunks so that no request waits on a remote call unless its tenant's local
  lease ran out;
- ``fairness.py``: the Virtual Token Counter that orders tenants inside a
  priority class by tokens served (Sheng et al., "Fairness in Serving Large
  Language Models", OSDI 2024).

The decision cores (tenants, limits, fairness) import neither Ray nor vLLM.
"""
