from services.common.server import serve
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings

if __name__ == "__main__":
    settings = GatewaySettings()  # type: ignore[call-arg]  # Cognito settings come from env
    serve(create_app(settings), settings)
