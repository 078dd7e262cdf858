"""Typed settings a job's config resolves into (:mod:`fedml_prism.job` reads every key once, through
these): security, MQTT broker and S3, gRPC addresses, MNN parse limits. Below the runtimes: no
networking, no FedML."""
