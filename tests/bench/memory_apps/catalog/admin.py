from django.contrib import admin

from .models import Author, Book, Publisher, Review


class ReviewInline(admin.TabularInline):
    model = Review
    extra = 0


@admin.register(Book)
class BookAdmin(admin.ModelAdmin):
    list_display = ["title", "publisher", "published", "price"]
    list_filter = ["publisher", "published"]
    search_fields = ["title", "authors__name"]
    inlines = [ReviewInline]


@admin.register(Author)
class AuthorAdmin(admin.ModelAdmin):
    list_display = ["name", "born"]
    search_fields = ["name"]


@admin.register(Publisher)
class PublisherAdmin(admin.ModelAdmin):
    list_display = ["name", "country"]


@admin.register(Review)
class ReviewAdmin(admin.ModelAdmin):
    list_display = ["book", "rating", "created"]
    list_filter = ["rating"]
