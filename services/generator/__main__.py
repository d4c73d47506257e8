from services.common.server import serve
from services.generator.app import create_app
from services.generator.settings import GeneratorSettings

if __name__ == "__main__":
    settings = GeneratorSettings()
    serve(create_app(settings), settings)
