from services.common.server import serve
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings

if __name__ == "__main__":
    settings = GatewaySettings()  # Cognito settings come from the environment
    serve(create_app(settings), settings)
