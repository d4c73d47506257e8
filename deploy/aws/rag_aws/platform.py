"""The platform stack: network, Aurora with pgvector, Cognito, secrets, the ECS cluster with
its GPU host group, the four services, the load balancer and autoscaling.

Traffic allowed, and nothing else: the internet to the load balancer (HTTPS; HTTP only to
redirect), the load balancer to the gateway, the gateway to the retriever and the generator,
the retriever to the embedder and the database. Services find each other through Cloud Map
(`<service>.<prefix>.internal`).
"""

from __future__ import annotations

from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_applicationautoscaling as appscaling
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_certificatemanager as acm
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cognito as cognito
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_rds as rds
from aws_cdk import aws_route53 as route53
from aws_cdk import aws_route53_targets as route53_targets
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_servicediscovery as servicediscovery
from aws_cdk import aws_sns as sns
from cdk_nag import NagPackSuppression, NagSuppressions
from constructs import Construct

from rag_aws.config import RETENTION, DeployConfig
from rag_aws.nag import ECR_TOKEN, ENV_CONFIG, TASK_SECRETS_AT_START, accept
from rag_aws.registry import repository_name
from rag_aws.services import (
    DB_NAME,
    DB_OWNER,
    DB_PORT,
    GATEWAY_DEREGISTRATION_S,
    PORTS,
    ServiceShape,
    generator_queue_metric,
    service_shapes,
)


class PlatformStack(cdk.Stack):
    def __init__(
        self, scope: Construct, id: str, *, config: DeployConfig, **kwargs: object
    ) -> None:
        super().__init__(scope, id, **kwargs)  # type: ignore[arg-type]
        self.config = config
        self.vpc = self._network()
        self.groups = self._security_groups()
        self.database, self.owner_secret = self._database()
        self.app_db_secret = self._secret("AppDbPassword", "the rag_app login's password")
        self.service_token = self._secret("ServiceToken", "the gateway-retriever service token")
        self.user_pool, self.app_client = self._cognito()
        self.cluster = self._cluster()
        self.gpu_capacity = self._gpu_capacity()
        shapes = service_shapes(
            config,
            issuer=self.user_pool.user_pool_provider_url,
            client_id=self.app_client.user_pool_client_id,
            database_host=self.database.cluster_endpoint.hostname,
            namespace=f"{config.prefix}.internal",
        )
        self.services = {shape.name: self._service(shape) for shape in shapes}
        self.load_balancer = self._load_balancer()
        self._autoscaling()
        self._outputs()

    # -- network -------------------------------------------------------------------------

    def _network(self) -> ec2.IVpc:
        config = self.config
        if config.vpc_id:
            # Needs the account (CDK_DEFAULT_ACCOUNT); the answer is cached in cdk.context.json.
            # The VPC needs private subnets with a route out (NAT) in at least two zones.
            return ec2.Vpc.from_lookup(self, "Vpc", vpc_id=config.vpc_id)
        flow_logs = logs.LogGroup(
            self, "FlowLogs", retention=self._retention(), removal_policy=cdk.RemovalPolicy.DESTROY
        )
        vpc = ec2.Vpc(
            self,
            "Vpc",
            max_azs=2,
            nat_gateways=config.nat_gateways,
            subnet_configuration=[
                ec2.SubnetConfiguration(
                    name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24
                ),
                ec2.SubnetConfiguration(
                    name="private", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=20
                ),
            ],
            flow_logs={
                "rejected": ec2.FlowLogOptions(
                    destination=ec2.FlowLogDestination.to_cloud_watch_logs(flow_logs),
                    traffic_type=ec2.FlowLogTrafficType.REJECT,
                )
            },
        )
        # Image pulls, logs and secrets stay inside the VPC (and off the NAT's per-GB bill:
        # a 25 GB generator image per GPU host start).
        vpc.add_gateway_endpoint("S3", service=ec2.GatewayVpcEndpointAwsService.S3)
        for name, service in (
            ("EcrApi", ec2.InterfaceVpcEndpointAwsService.ECR),
            ("EcrDocker", ec2.InterfaceVpcEndpointAwsService.ECR_DOCKER),
            ("Logs", ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_LOGS),
            ("Secrets", ec2.InterfaceVpcEndpointAwsService.SECRETS_MANAGER),
        ):
            endpoint = vpc.add_interface_endpoint(
                name,
                service=service,
                subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
            )
            # The rule cannot read the ingress rule's CIDR (a token): it admits HTTPS from
            # the VPC's own CIDR only, which CDK sets for interface endpoints.
            NagSuppressions.add_resource_suppressions(
                endpoint,
                [
                    NagPackSuppression(
                        id="CdkNagValidationFailure",
                        reason="HTTPS from the VPC's CIDR only (a token the rule cannot read)",
                        applies_to=["AwsSolutions-EC23"],
                    )
                ],
                apply_to_children=True,
            )
        return vpc

    def _private(self) -> ec2.SubnetSelection:
        return ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)

    def _security_groups(self) -> dict[str, ec2.SecurityGroup]:
        def group(name: str, description: str, outbound: bool = True) -> ec2.SecurityGroup:
            return ec2.SecurityGroup(
                self,
                f"{name}Sg",
                vpc=self.vpc,
                description=description,
                allow_all_outbound=outbound,
            )

        groups = {
            "alb": group("Alb", "Load balancer: HTTPS from the internet"),
            "gateway": group("Gateway", "Gateway tasks: from the load balancer only"),
            "retriever": group("Retriever", "Retriever tasks: from the gateway only"),
            "generator": group("Generator", "Generator tasks: from the gateway only"),
            "embedder": group("Embedder", "Embedder tasks: from the retriever only"),
            "database": group("Database", "Aurora: from the retriever only", outbound=False),
            "gpu_hosts": group("GpuHosts", "GPU hosts: no inbound; tasks have their own groups"),
        }
        groups["alb"].add_ingress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "HTTPS")
        groups["alb"].add_ingress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(80), "to HTTPS")
        accept(
            groups["alb"],
            "EC23",
            "The public API: the load balancer takes HTTPS (443) from anywhere and answers "
            "port 80 only with a redirect to 443.",
        )
        for source, target, port in (
            ("alb", "gateway", PORTS["gateway"]),
            ("gateway", "retriever", PORTS["retriever"]),
            ("gateway", "generator", PORTS["generator"]),
            ("retriever", "embedder", PORTS["embedder"]),
            ("retriever", "database", DB_PORT),
        ):
            groups[target].add_ingress_rule(groups[source], ec2.Port.tcp(port), f"from {source}")
        return groups

    # -- data ----------------------------------------------------------------------------

    def _database(self) -> tuple[rds.DatabaseCluster, secretsmanager.ISecret]:
        config = self.config
        cluster = rds.DatabaseCluster(
            self,
            "Database",
            # Aurora PostgreSQL 17.5 ships pgvector 0.8 (iterative index scans, which the
            # retriever's filtered searches use).
            engine=rds.DatabaseClusterEngine.aurora_postgres(
                version=rds.AuroraPostgresEngineVersion.VER_17_5
            ),
            writer=rds.ClusterInstance.serverless_v2("Writer"),
            serverless_v2_min_capacity=config.db_min_acu,
            serverless_v2_max_capacity=config.db_max_acu,
            vpc=self.vpc,
            vpc_subnets=self._private(),
            security_groups=[self.groups["database"]],
            port=DB_PORT,
            default_database_name=DB_NAME,
            credentials=rds.Credentials.from_generated_secret(
                DB_OWNER, exclude_characters=" %+~`#$&*()|[]{}:;<>?!'/@\"\\"
            ),
            parameters={"rds.force_ssl": "1"},
            storage_encrypted=True,
            deletion_protection=config.deletion_protection,
            removal_policy=cdk.RemovalPolicy.SNAPSHOT,
            backup=rds.BackupProps(retention=cdk.Duration.days(7)),
            cluster_identifier=f"{config.prefix}-db",
            cloudwatch_logs_exports=["postgresql"],
            iam_authentication=False,
        )
        # Its log group made here, with its retention (not by a Lambda-backed custom resource).
        postgres_logs = logs.LogGroup(
            self,
            "DatabaseLogs",
            log_group_name=f"/aws/rds/cluster/{config.prefix}-db/postgresql",
            retention=self._retention(),
            removal_policy=cdk.RemovalPolicy.DESTROY,
        )
        cluster.node.add_dependency(postgres_logs)
        accept(
            cluster,
            "RDS6",
            "The retriever authenticates with passwords from Secrets Manager over TLS "
            "(rds.force_ssl); IAM tokens expire every 15 minutes, which its connection pool "
            "does not renew yet.",
        )
        assert cluster.secret is not None
        accept(cluster.node.find_child("Secret"), "SMG4", TASK_SECRETS_AT_START)
        return cluster, cluster.secret

    def _secret(self, id: str, description: str) -> secretsmanager.Secret:
        secret = secretsmanager.Secret(
            self,
            id,
            description=f"{self.config.prefix}: {description}",
            generate_secret_string=secretsmanager.SecretStringGenerator(
                password_length=48, exclude_punctuation=True
            ),
        )
        accept(secret, "SMG4", TASK_SECRETS_AT_START)
        return secret

    def _cognito(self) -> tuple[cognito.UserPool, cognito.UserPoolClient]:
        pool = cognito.UserPool(
            self,
            "Users",
            self_sign_up_enabled=False,  # an administrator creates users (README)
            sign_in_aliases=cognito.SignInAliases(username=True, email=True),
            password_policy=cognito.PasswordPolicy(
                min_length=12,
                require_lowercase=True,
                require_uppercase=True,
                require_digits=True,
                require_symbols=True,
                temp_password_validity=cdk.Duration.days(3),
            ),
            mfa=cognito.Mfa.OPTIONAL,
            mfa_second_factor=cognito.MfaSecondFactor(otp=True, sms=False),
            account_recovery=cognito.AccountRecovery.EMAIL_ONLY,
            removal_policy=cdk.RemovalPolicy.RETAIN,
        )
        client = pool.add_client(
            "Api",
            generate_secret=False,  # apps and the CLI are public clients
            # Password sign-in for the CLI and load tests (ragctl, locust); SRP for apps.
            auth_flows=cognito.AuthFlow(user_password=True, user_srp=True),
            access_token_validity=cdk.Duration.hours(1),
            id_token_validity=cdk.Duration.hours(1),
            refresh_token_validity=cdk.Duration.days(30),
            prevent_user_existence_errors=True,
        )
        accept(
            pool,
            "COG2",
            "MFA is offered (TOTP) but not required: API clients and load tests sign in with "
            "a password; require it per pool in production when users are people.",
        )
        accept(
            pool,
            "COG8",
            "The Plus feature plan (threat protection) is billed per active user; turn it on "
            "in the console when the pool serves people rather than services.",
        )
        return pool, client

    # -- compute -------------------------------------------------------------------------

    def _cluster(self) -> ecs.Cluster:
        return ecs.Cluster(
            self,
            "Cluster",
            vpc=self.vpc,
            container_insights_v2=ecs.ContainerInsights.ENABLED,
            default_cloud_map_namespace=ecs.CloudMapNamespaceOptions(
                name=f"{self.config.prefix}.internal",
                type=servicediscovery.NamespaceType.DNS_PRIVATE,
                vpc=self.vpc,
            ),
        )

    def _gpu_capacity(self) -> ecs.AsgCapacityProvider:
        config = self.config
        role = iam.Role(
            self,
            "GpuHostRole",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            managed_policies=[
                iam.ManagedPolicy.from_aws_managed_policy_name(
                    "service-role/AmazonEC2ContainerServiceforEC2Role"
                ),
                # Session Manager instead of SSH: no key pairs, no inbound port.
                iam.ManagedPolicy.from_aws_managed_policy_name("AmazonSSMManagedInstanceCore"),
            ],
        )
        user_data = ec2.UserData.for_linux()
        user_data.add_commands(
            # A task restarted on the same host starts from the cached image (and weights).
            "echo ECS_IMAGE_PULL_BEHAVIOR=prefer-cached >> /etc/ecs/ecs.config",
            "echo ECS_ENABLE_GPU_SUPPORT=true >> /etc/ecs/ecs.config",
        )
        template = ec2.LaunchTemplate(
            self,
            "GpuHosts",
            instance_type=ec2.InstanceType(config.gpu_instance_type),
            # The Amazon Linux 2023 GPU AMI, from its SSM parameter at deploy time: its NVIDIA
            # driver runs the CUDA 12.8 of the vLLM 0.11 image (the Amazon Linux 2 one does not).
            machine_image=ecs.EcsOptimizedImage.amazon_linux2023(ecs.AmiHardwareType.GPU),
            role=role,
            security_group=self.groups["gpu_hosts"],
            user_data=user_data,
            require_imdsv2=True,
            http_put_response_hop_limit=1,  # tasks (awsvpc) cannot reach the host's credentials
            detailed_monitoring=True,
            block_devices=[
                ec2.BlockDevice(
                    device_name="/dev/xvda",
                    volume=ec2.BlockDeviceVolume.ebs(
                        config.gpu_root_volume_gib,
                        volume_type=ec2.EbsDeviceVolumeType.GP3,
                        encrypted=True,
                        # 500 MB/s: the 25 GB image unpacks (and weights load) at 4x gp3's base.
                        throughput=500,
                        iops=6000,
                        delete_on_termination=True,
                    ),
                )
            ],
        )
        topic = sns.Topic(
            self,
            "GpuHostEvents",
            display_name=f"{config.prefix} GPU host scaling events",
            master_key=kms.Alias.from_alias_name(self, "SnsKey", "alias/aws/sns"),
            enforce_ssl=True,
        )
        if config.alarm_email:
            sns.Subscription(
                self,
                "AlarmEmail",
                topic=topic,
                endpoint=config.alarm_email,
                protocol=sns.SubscriptionProtocol.EMAIL,
            )
        gpu_tasks = config.generator_max_tasks + (1 if config.embedder_placement == "gpu" else 0)
        group = autoscaling.AutoScalingGroup(
            self,
            "GpuGroup",
            vpc=self.vpc,
            vpc_subnets=self._private(),
            launch_template=template,
            min_capacity=0,  # hosts follow the tasks: none when the generator is at zero
            # One GPU task per host, plus one host for a rolling deployment's new task.
            max_capacity=gpu_tasks + 1,
            notifications=[autoscaling.NotificationConfiguration(topic=topic)],
        )
        capacity = ecs.AsgCapacityProvider(
            self,
            "GpuCapacity",
            auto_scaling_group=group,
            enable_managed_scaling=True,
            target_capacity_percent=100,
            enable_managed_termination_protection=True,  # never drop a host with a task
            enable_managed_draining=True,
            instance_warmup_period=300,
        )
        self.cluster.add_asg_capacity_provider(capacity)
        accept(
            role,
            "IAM4",
            "AWS's maintained policies for the ECS agent on container instances and for "
            "Session Manager (no SSH keys, no inbound port); AWS updates them with the agent.",
            applies_to=[
                "Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
                "AmazonEC2ContainerServiceforEC2Role",
                "Policy::arn:<AWS::Partition>:iam::aws:policy/AmazonSSMManagedInstanceCore",
            ],
        )
        accept(
            role,
            "IAM5",
            "The ECS agent's own actions (ecs:Submit*, and the cluster-wide ones CDK grants "
            "for the capacity provider) have no narrower resource.",
            applies_to=["Action::ecs:Submit*", "Resource::*"],
        )
        return capacity

    def _service(self, shape: ServiceShape) -> ecs.BaseService:
        config = self.config
        log_group = logs.LogGroup(
            self,
            f"{shape.title}Logs",
            log_group_name=f"/{config.prefix}/{shape.name}",
            retention=self._retention(),
            removal_policy=cdk.RemovalPolicy.DESTROY,
        )
        if shape.gpu:
            task: ecs.TaskDefinition = ecs.Ec2TaskDefinition(
                self, f"{shape.title}Task", network_mode=ecs.NetworkMode.AWS_VPC
            )
        else:
            task = ecs.FargateTaskDefinition(
                self,
                f"{shape.title}Task",
                cpu=shape.cpu,
                memory_limit_mib=shape.memory_mib,
                runtime_platform=ecs.RuntimePlatform(
                    cpu_architecture=ecs.CpuArchitecture.X86_64,
                    operating_system_family=ecs.OperatingSystemFamily.LINUX,
                ),
            )
        secrets = {
            name: self._ecs_secret(source, field) for name, (source, field) in shape.secrets.items()
        }
        accept(task, "ECS2", ENV_CONFIG)
        task.add_container(
            shape.name,
            image=ecs.ContainerImage.from_ecr_repository(
                self._repository(shape.name), tag=config.image_tag
            ),
            environment=shape.environment,
            secrets=secrets,
            logging=ecs.LogDrivers.aws_logs(stream_prefix=shape.name, log_group=log_group),
            port_mappings=[ecs.PortMapping(container_port=shape.port, name=shape.name)],
            # ECS ignores the image's HEALTHCHECK: declared here, on /readyz, so a task that
            # never becomes ready (or stops being) is replaced.
            health_check=ecs.HealthCheck(
                command=[
                    "CMD",
                    "python3",
                    "-c",
                    "import urllib.request; urllib.request.urlopen("
                    f"'http://127.0.0.1:{shape.port}{shape.health_path}', timeout=4)",
                ],
                interval=cdk.Duration.seconds(30),
                timeout=cdk.Duration.seconds(5),
                retries=shape.health_retries,
                start_period=cdk.Duration.seconds(shape.start_period_s),
            ),
            # SIGTERM, then this long before SIGKILL: longer than the service's drain.
            stop_timeout=cdk.Duration.seconds(shape.stop_timeout_s),
            gpu_count=1 if shape.gpu else None,
            memory_reservation_mib=shape.memory_mib if shape.gpu else None,
            # vLLM's engine process shares tensors with its API server through /dev/shm.
            linux_parameters=(
                ecs.LinuxParameters(self, f"{shape.title}Linux", shared_memory_size=2048)
                if shape.gpu
                else None
            ),
        )
        cloud_map = ecs.CloudMapOptions(
            name=shape.name,
            container_port=shape.port,
            dns_record_type=servicediscovery.DnsRecordType.A,
            dns_ttl=cdk.Duration.seconds(10),
        )
        common: dict[str, Any] = {
            "cluster": self.cluster,
            "task_definition": task,
            "desired_count": shape.min_tasks,
            "security_groups": [self.groups[shape.name]],
            "vpc_subnets": self._private(),
            "cloud_map_options": cloud_map if shape.discoverable else None,
            "circuit_breaker": ecs.DeploymentCircuitBreaker(enable=True, rollback=True),
            "min_healthy_percent": 100,
            "max_healthy_percent": 200,
            "enable_ecs_managed_tags": True,
            "propagate_tags": ecs.PropagatedTagSource.SERVICE,
        }
        assert task.execution_role is not None
        accept(task.execution_role, "IAM5", ECR_TOKEN, applies_to=["Resource::*"])
        if shape.gpu:
            return ecs.Ec2Service(
                self,
                f"{shape.title}Service",
                capacity_provider_strategies=[
                    ecs.CapacityProviderStrategy(
                        capacity_provider=self.gpu_capacity.capacity_provider_name, weight=1
                    )
                ],
                **common,
            )
        return ecs.FargateService(
            self,
            f"{shape.title}Service",
            health_check_grace_period=(
                cdk.Duration.seconds(shape.start_period_s) if shape.name == "gateway" else None
            ),
            **common,
        )

    def _ecs_secret(self, source: str, field: str | None) -> ecs.Secret:
        secret = {
            "owner": self.owner_secret,
            "app_db": self.app_db_secret,
            "service_token": self.service_token,
        }[source]
        return ecs.Secret.from_secrets_manager(secret, field)

    def _repository(self, service: str) -> ecr.IRepository:
        # By name, not by a cross-stack reference: the registry outlives platform stacks.
        return ecr.Repository.from_repository_name(
            self, f"{service.capitalize()}Repo", repository_name(self.config.prefix, service)
        )

    # -- the load balancer ---------------------------------------------------------------

    def _load_balancer(self) -> elbv2.ApplicationLoadBalancer:
        access_logs = s3.Bucket(
            self,
            "AccessLogs",
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            lifecycle_rules=[s3.LifecycleRule(expiration=cdk.Duration.days(90))],
            removal_policy=cdk.RemovalPolicy.RETAIN,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_PREFERRED,
        )
        accept(
            access_logs,
            "S1",
            "This bucket holds the load balancer's access logs; logging its own accesses "
            "into another bucket would only log the logging.",
        )
        alb = elbv2.ApplicationLoadBalancer(
            self,
            "Alb",
            vpc=self.vpc,
            internet_facing=True,
            security_group=self.groups["alb"],
            # A non-streamed answer sends nothing until it is done (up to the gateway's
            # generator timeout, 300 s); streams send a comment every 10 s.
            idle_timeout=cdk.Duration.seconds(330),
            drop_invalid_header_fields=True,
            deletion_protection=False,
        )
        alb.log_access_logs(access_logs, prefix="alb")
        certificate = self._certificate(alb)
        listener = alb.add_listener(
            "Https",
            port=443,
            protocol=elbv2.ApplicationProtocol.HTTPS,
            certificates=[certificate],
            ssl_policy=elbv2.SslPolicy.RECOMMENDED_TLS,
            open=False,  # the security group above already admits 443
        )
        gateway = self.services["gateway"]
        assert isinstance(gateway, ecs.FargateService)
        self.gateway_targets = listener.add_targets(
            "Gateway",
            port=PORTS["gateway"],
            protocol=elbv2.ApplicationProtocol.HTTP,
            targets=[
                gateway.load_balancer_target(
                    container_name="gateway", container_port=PORTS["gateway"]
                )
            ],
            health_check=elbv2.HealthCheck(
                path="/readyz",
                interval=cdk.Duration.seconds(15),
                timeout=cdk.Duration.seconds(5),
                healthy_threshold_count=2,
                unhealthy_threshold_count=3,
            ),
            # The gateway drains its streams on SIGTERM; the balancer waits as long.
            deregistration_delay=cdk.Duration.seconds(GATEWAY_DEREGISTRATION_S),
        )
        alb.add_redirect(source_port=80, target_port=443)
        return alb

    def _certificate(self, alb: elbv2.ApplicationLoadBalancer) -> elbv2.IListenerCertificate:
        config = self.config
        if config.certificate_arn:
            return elbv2.ListenerCertificate.from_arn(config.certificate_arn)
        zone = route53.HostedZone.from_hosted_zone_attributes(
            self, "Zone", hosted_zone_id=config.hosted_zone_id, zone_name=config.hosted_zone_name
        )
        certificate = acm.Certificate(
            self,
            "Certificate",
            domain_name=config.domain_name,
            validation=acm.CertificateValidation.from_dns(zone),
        )
        route53.ARecord(
            self,
            "Alias",
            zone=zone,
            record_name=config.domain_name,
            target=route53.RecordTarget.from_alias(route53_targets.LoadBalancerTarget(alb)),
        )
        return elbv2.ListenerCertificate.from_certificate_manager(certificate)

    # -- autoscaling ---------------------------------------------------------------------

    def _autoscaling(self) -> None:
        config = self.config
        gateway = self.services["gateway"].auto_scale_task_count(
            min_capacity=config.gateway_min_tasks, max_capacity=config.gateway_max_tasks
        )
        gateway.scale_on_request_count(
            "Requests",
            requests_per_target=config.gateway_requests_per_target,
            target_group=self.gateway_targets,
        )
        retriever = self.services["retriever"].auto_scale_task_count(
            min_capacity=config.retriever_min_tasks, max_capacity=config.retriever_max_tasks
        )
        retriever.scale_on_cpu_utilization("Cpu", target_utilization_percent=60)
        if config.embedder_placement == "cpu":
            embedder = self.services["embedder"].auto_scale_task_count(
                min_capacity=1, max_capacity=4
            )
            embedder.scale_on_cpu_utilization("Cpu", target_utilization_percent=60)

        generator = self.services["generator"].auto_scale_task_count(
            min_capacity=config.generator_min_tasks, max_capacity=config.generator_max_tasks
        )
        # vLLM's waiting requests, averaged over the generator's tasks (each publishes its
        # own every minute): above the target, another GPU host and task; the slow scale-in
        # keeps a warm host through short lulls.
        namespace, metric_name, dimensions = generator_queue_metric(config)
        generator.scale_to_track_custom_metric(
            "Queue",
            metric=cloudwatch.Metric(
                namespace=namespace,
                metric_name=metric_name,
                dimensions_map=dimensions,
                statistic="Average",
                period=cdk.Duration.minutes(1),
            ),
            target_value=config.generator_waiting_target,
            scale_out_cooldown=cdk.Duration.minutes(3),
            scale_in_cooldown=cdk.Duration.minutes(15),
        )
        if config.generator_off_schedule:
            zone = cdk.TimeZone.of(config.schedule_timezone)
            generator.scale_on_schedule(
                "Off",
                schedule=appscaling.Schedule.expression(f"cron({config.generator_off_schedule})"),
                min_capacity=0,
                max_capacity=0,
                time_zone=zone,
            )
            generator.scale_on_schedule(
                "On",
                schedule=appscaling.Schedule.expression(f"cron({config.generator_on_schedule})"),
                min_capacity=max(1, config.generator_min_tasks),
                max_capacity=config.generator_max_tasks,
                time_zone=zone,
            )

    def _outputs(self) -> None:
        config = self.config
        url = (
            f"https://{config.domain_name}"
            if config.domain_name
            else f"https://{self.load_balancer.load_balancer_dns_name}"
        )
        cdk.CfnOutput(self, "ApiUrl", value=url, description="The gateway's public URL")
        cdk.CfnOutput(
            self,
            "LoadBalancerDns",
            value=self.load_balancer.load_balancer_dns_name,
            description="Point your domain's CNAME here when the certificate is your own",
        )
        cdk.CfnOutput(self, "UserPoolId", value=self.user_pool.user_pool_id)
        cdk.CfnOutput(self, "UserPoolClientId", value=self.app_client.user_pool_client_id)
        cdk.CfnOutput(self, "Issuer", value=self.user_pool.user_pool_provider_url)
        cdk.CfnOutput(self, "ClusterName", value=self.cluster.cluster_name)
        cdk.CfnOutput(self, "DatabaseEndpoint", value=self.database.cluster_endpoint.hostname)

    def _retention(self) -> logs.RetentionDays:
        return logs.RetentionDays[RETENTION[self.config.log_retention_days]]
