from django.contrib import admin

from api.models import Concept, Dataset, Job, NetworkModel, Unit

admin.site.register([NetworkModel, Dataset, Concept, Job, Unit])
