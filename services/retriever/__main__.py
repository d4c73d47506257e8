from services.common.server import serve
from services.retriever.app import create_app
from services.retriever.settings import RetrieverSettings

if __name__ == "__main__":
    settings = RetrieverSettings()
    serve(create_app(settings), settings)
