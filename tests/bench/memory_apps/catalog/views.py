from django.db.models import Avg, Count
from django.shortcuts import get_object_or_404, render

from .models import Book


def books(request):
    """A page of books with their publisher, authors and review figures: two queries."""
    page = (Book.objects.select_related("publisher").prefetch_related("authors")
            .annotate(reviews_count=Count("reviews"), rating=Avg("reviews__rating"))
            .order_by("title")[:50])
    return render(request, "catalog/books.html", {"books": page})


def book(request, pk):
    return render(request, "catalog/book.html",
                  {"book": get_object_or_404(Book.objects.select_related("publisher"), pk=pk)})
