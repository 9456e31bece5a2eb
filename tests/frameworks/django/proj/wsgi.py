"""WSGI entry point. DJANGO_SETTINGS_MODULE comes from the release's cadenza.toml ([workers.env])."""

from django.core.wsgi import get_wsgi_application

application = get_wsgi_application()
