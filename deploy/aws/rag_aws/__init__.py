"""The platform on AWS as CDK v2 stacks: `RagRegistry` (the image repositories) and
`RagPlatform` (network, database, Cognito, ECS services, load balancer, autoscaling)."""
