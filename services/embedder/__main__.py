from services.common.server import serve
from services.embedder.app import create_app
from services.embedder.settings import EmbedderSettings

if __name__ == "__main__":
    settings = EmbedderSettings()
    serve(create_app(settings), settings)
