"""The smallest Django project with CSRF protection: no database, no templates, no contrib apps."""

SECRET_KEY = "cadenza-tests-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "proj.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE = ["django.middleware.csrf.CsrfViewMiddleware"]
DATABASES: dict = {}
USE_TZ = True
