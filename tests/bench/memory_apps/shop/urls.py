from catalog import views
from django.contrib import admin
from django.urls import path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("books/", views.books, name="books"),
    path("books/<int:pk>/", views.book, name="book"),
]
