"""X-Worker-Pid on every response, so that the benchmark can tell that each worker was served."""
import os


def worker_pid(get_response):
    def middleware(request):
        response = get_response(request)
        response["X-Worker-Pid"] = str(os.getpid())
        return response
    return middleware
