"""`manage.py seed`: a deterministic catalogue (20 publishers, 100 authors, 500 books with one
to three authors each, 2,000 reviews) and an admin user, into an empty, migrated database."""
import datetime
import random
from decimal import Decimal

from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from catalog.models import Author, Book, Publisher, Review


class Command(BaseCommand):
    help = "Fill an empty, migrated database with a deterministic catalogue and an admin user."

    @transaction.atomic
    def handle(self, *args, **options):
        if Book.objects.exists():
            raise CommandError("the database already holds books: seed an empty, migrated one")
        rnd = random.Random(13)
        publishers = Publisher.objects.bulk_create(
            Publisher(name=f"Publisher {i}", country=rnd.choice(["FR", "DE", "UK", "US", "JP"]))
            for i in range(20))
        authors = Author.objects.bulk_create(
            Author(name=f"Author {i}", born=datetime.date(1900 + rnd.randrange(100), 1 + rnd.randrange(12), 1))
            for i in range(100))
        books = Book.objects.bulk_create(
            Book(title=f"Book {i:04d}", publisher=rnd.choice(publishers),
                 published=datetime.date(1950 + rnd.randrange(70), 1 + rnd.randrange(12), 1),
                 price=Decimal(rnd.randrange(500, 6000)) / 100)
            for i in range(500))
        links = [Book.authors.through(book_id=b.pk, author_id=a.pk)
                 for b in books for a in rnd.sample(authors, rnd.randint(1, 3))]
        Book.authors.through.objects.bulk_create(links)
        Review.objects.bulk_create(
            Review(book=rnd.choice(books), rating=rnd.randint(1, 5), text=f"Review {i}: " + "fine " * rnd.randint(3, 30))
            for i in range(2000))
        User.objects.create_superuser("admin", "admin@example.com", "admin")
        self.stdout.write(f"seeded {len(publishers)} publishers, {len(authors)} authors, {len(books)} books, "
                          f"{len(links)} book-author links, 2000 reviews, user admin")
