"""The web dashboard, served by the operator (DASHBOARD_ENABLED): schedules, scrape requests, queues and failed jobs,
and the actions on them, each authorized by the caller's own Kubernetes RBAC (TokenReview, then SubjectAccessReview,
as Argo Server's `--auth-mode=client`) and carried out as the operator."""
